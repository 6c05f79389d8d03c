"""
Stage 1 of LightReasoner (Wang et al., arXiv 2510.07962): find the expert's special moments.

The expert answers each training question greedily. At every generated position t we compare
its next-token distribution π_E with the amateur's π_A on the same prefix. Where they
disagree enough, KL(π_E‖π_A) > β, the position is kept, with the soft label
v_C = softmax(log π_E − log π_A) over its plausible tokens {a : π_E(a) ≥ α·max π_E}.
Stage 2 (train.py) tunes the expert on them.

    python sample.py                                  # the paper: 1000 GSM8K train questions
    python sample.py --max-questions 50 --batch-size 16
    python sample.py --data my_questions.jsonl        # any JSONL with a "question" field
    python sample.py --select random --out-dir out_random   # ablation: as many positions, anywhere
    python sample.py --select sft --max-questions 7473 --max-new-tokens 512 --out-dir out_sft
    torchrun --standalone --nproc_per_node 8 sample.py      # 8 GPUs, the batches dealt round robin

Writes out/samples.jsonl, rollouts.jsonl, sample_config.json (the run's record) and rollouts.html.
Kill it at any moment and run the same command again: it resumes (README: Resuming a run).
"""
import glob
import json
import os
import random
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from common import (DEFAULT_SYSTEM_PROMPT, RANK, WORLD_SIZE, append_jsonl, barrier, chat_prompt_ids,
                    complete_lines, device_name, die, download, dtype_name, esc, fingerprint,
                    finish_run, greedy_generate, heat, init_distributed, left_pad, load_model,
                    load_tokenizer, master, merge_parts, page, parse_flags, part_path, peek_json,
                    peek_jsonl, pick_dtype, position_ids, read_jsonl, start_run, stop_token_ids,
                    sum_over_ranks, write_jsonl, write_page)


# -----------------------------------------------------------------------------
# configuration: the defaults reproduce the paper
_before = set(globals())  # the imports (RANK, master, ...), which are no flags
expert = "Qwen/Qwen2.5-Math-1.5B"  # π_E: the strong model that stage 2 fine-tunes
amateur = "Qwen/Qwen2.5-0.5B"  # π_A: the weak model whose mistakes show what is special
data = "gsm8k"  # "gsm8k" (GSM8K train, downloaded once) or a JSONL file with a "question" field
max_questions = 1000  # the first N questions (paper: 1000 GSM8K questions)
max_new_tokens = 128  # length of each expert rollout (paper: 128)
alpha = 0.2  # plausibility cut α: keep tokens with π_E(a) ≥ α·max π_E (paper: 0.2)
beta = 0.4  # KL threshold β: keep position t iff KL(π_E‖π_A) > β (paper: 0.4)
select = "kl"  # positions to tune: "kl" (KL > β, the paper), "all", "random" (as many as kl, at
# random places), or "sft" (the paper's SFT baseline: the expert's right answers, every token)
system_prompt = DEFAULT_SYSTEM_PROMPT  # the chat prompt's system turn (the reference's)
batch_size = 0  # questions generated together; 0: 64 on a GPU, 8 on the CPU
chunk = 16  # generated positions whose full-vocabulary distributions are held at once (memory)
out_dir = "out"
device = "auto"  # cuda if available, else cpu
dtype = "auto"  # bfloat16 on cuda, float32 on cpu; distributions are always float32
seed = 1337  # torch seed; also draws the positions of --select random
config_keys = [k for k, v in globals().items() if k not in _before and isinstance(v, (int, float, str))]

GSM8K_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
             "grade_school_math/data/train.jsonl")


# -----------------------------------------------------------------------------
# the method: roll out with π_E, contrast with π_A at every position, keep the special ones

def completion_lengths(generated, stop_ids):
    """Tokens of each rollout up to and including its first stop token (ending is a choice)."""
    is_stop = torch.isin(generated, torch.tensor(stop_ids, device=generated.device))
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, generated.shape[1])
    return first.tolist()

@torch.no_grad()
def hidden_states(model, input_ids, attention_mask):
    """One teacher-forced pass: last hidden states (B, L, H); lm_head later, by chunks."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                               position_ids=position_ids(attention_mask)).last_hidden_state

@torch.no_grad()
def log_probs(model, hidden, vocab):
    """log π cut to the ids both models share, (B, c, H) -> (B, c, vocab). The lm_head runs in
    float32 (cheap at a chunk): a bf16 model's logits are not rounded before the softmax."""
    head = model.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias.float()
    return F.linear(hidden.float(), head.weight.float(), bias).log_softmax(-1)[..., :vocab]

def contrast(logp_expert, logp_amateur, alpha):
    """The heart of LightReasoner, on (..., V) log-probs: KL, plausible set, soft label v_C."""
    p_expert = logp_expert.exp()
    kl = (p_expert * (logp_expert - logp_amateur)).sum(-1)  # KL(π_E‖π_A)
    plausible = p_expert >= alpha * p_expert.max(-1, keepdim=True).values  # the plausible set
    contrast_score = (logp_expert - logp_amateur).masked_fill(~plausible, float("-inf"))
    soft_label = contrast_score.softmax(-1)  # v_C: softmax of log π_E − log π_A on the set
    return kl, plausible, soft_label

def select_positions(kl, select, beta, seed, index):
    """The positions of a rollout that stage 2 tunes, from its KL at each. The paper's: KL > β; the
    ablations': all, or as many at random places (drawn from --seed and the question's index)."""
    special = [t for t, k in enumerate(kl) if k > beta]  # where the expert and the amateur differ
    if select == "all":
        return list(range(len(kl)))
    if select == "random":
        return sorted(random.Random(f"{seed}:{index}").sample(range(len(kl)), len(special)))
    return special

def plausible_entries(plausible, soft_label, logp_expert, logp_amateur, t0):
    """The plausible sets of a (B, c, V) chunk of positions t0 … t0+c−1, sparse (one nonzero for
    the whole chunk): each entry's (b, t, a) and its (v_C(a), π_E(a), π_A(a)), on the CPU."""
    b, c, a = plausible.nonzero().unbind(1)
    values = [soft_label[b, c, a], logp_expert[b, c, a].exp(), logp_amateur[b, c, a].exp()]
    return torch.stack([b, c + t0, a], 1).cpu(), torch.stack(values, 1).cpu()

def label_positions(results, where, values):
    """Each rollout's kept positions with their plausible set V, most contrastive first, as the
    columns of a record: r["labels"] = {t: dict(token_ids, weights (v_C), p_expert, p_amateur)}."""
    kept, sets = {(b, t) for b, r in enumerate(results) for t in r["kept"]}, {}
    for (b, t, a), v in zip(where.tolist(), values.tolist()):
        if (b, t) in kept:
            sets.setdefault((b, t), []).append((a, *v))
    names = ("token_ids", "weights", "p_expert", "p_amateur")
    for b, r in enumerate(results):
        by_v_C = {t: zip(*sorted(sets[b, t], key=lambda e: -e[1])) for t in r["kept"]}
        r["labels"] = {t: dict(zip(names, map(list, columns))) for t, columns in by_v_C.items()}
    return results

@torch.no_grad()
def sample_batch(expert_model, amateur_model, prompts, indices, pad_id, stop_ids, vocab):
    """Roll out prompts (token ids of questions `indices`) with the expert, contrast them with the
    amateur. Per prompt: completion_ids, kl at every position, kept positions and their labels."""
    dev = expert_model.device
    input_ids, prompt_mask = left_pad(prompts, pad_id, dev)  # (B, W): prompts end at column W-1
    width = input_ids.shape[1]
    # ids only the expert's padded output layer has (never trained) go, so the amateur reads all
    padded = range(vocab, expert_model.get_output_embeddings().out_features)
    generated, h_expert = greedy_generate(expert_model, input_ids, prompt_mask, max_new_tokens,
                                          stop_ids, pad_id, padded, hidden=True)  # (B,T), (B,T,H)
    lengths = completion_lengths(generated, stop_ids)
    results = [dict(completion_ids=ids[:n].tolist()) for ids, n in zip(generated, lengths)]
    if amateur_model is None:  # --select sft: the answers alone, no contrast
        return results
    # π_E comes from generate's own steps; the amateur reads the same ids in one forward pass
    steps = torch.arange(generated.shape[1], device=dev)
    answer_mask = (steps[None] < torch.tensor(lengths, device=dev)[:, None]).long()
    full_ids = torch.cat([input_ids, generated], 1)  # (B, L)
    full_mask = torch.cat([prompt_mask, answer_mask], 1)
    h_amateur = hidden_states(amateur_model, full_ids, full_mask)  # (B, L, H_A)
    kl, entries = [], []
    for t0 in range(0, max(lengths), chunk):
        t1 = min(t0 + chunk, max(lengths))
        logp_E = log_probs(expert_model, h_expert[:, t0:t1], vocab)  # (B, c, V) log π_E
        logp_A = log_probs(amateur_model, h_amateur[:, width - 1 + t0:width - 1 + t1], vocab)  # log π_A
        kl_chunk, plausible, soft_label = contrast(logp_E, logp_A, alpha)
        kl.append(kl_chunk.tolist())
        entries.append(plausible_entries(plausible, soft_label, logp_E, logp_A, t0))
    for b, r in enumerate(results):
        r["kl"] = [k for chunk_kl in kl for k in chunk_kl[b]][:lengths[b]]
        r["kept"] = select_positions(r["kl"], select, beta, seed, indices[b])
    return label_positions(results, *map(torch.cat, zip(*entries)))

def final_number(text):
    """The number an answer ends on: the last in its last \\boxed{}, else in the text."""
    boxed = text.split("\\boxed{")
    tail = boxed[-1].split("}")[0] if len(boxed) > 1 else text
    numbers = re.findall(r"-?\d+(?:\.\d+)?", tail.replace(",", ""))
    return float(numbers[-1]) if numbers else None

def is_correct(completion, answer):
    """Rejection sampling's filter: the completion's final number is the one after `####`."""
    pred, truth = final_number(completion), final_number(answer.split("####")[-1])
    return pred is not None and truth is not None and abs(pred - truth) < 1e-6


# -----------------------------------------------------------------------------
# the run, step by step, as __main__ at the end calls them

def check_flags():
    if not 0 < alpha <= 1:
        die(f"--alpha {alpha} must be in (0, 1]: the plausible set keeps π_E ≥ α·max π_E")
    if beta < 0:
        die(f"--beta {beta} must be ≥ 0: it is a KL threshold")
    if select not in ("kl", "all", "random", "sft"):
        die(f"--select {select} is not one of kl, all, random, sft")
    if max_new_tokens < 1 or max_questions < 1 or chunk < 1 or batch_size < 0:
        die("--max-new-tokens, --max-questions, --chunk must be ≥ 1; --batch-size ≥ 0")

def load_questions():
    """--data's path and its first max_questions questions, with ids (default: the question)."""
    path = os.path.join("data", "gsm8k", "train.jsonl") if data == "gsm8k" else data
    if data == "gsm8k" and master:
        download(GSM8K_URL, path)
    barrier()  # the other processes read what rank 0 downloaded
    rows = read_jsonl(path, "questions file", with_lines=True)
    if not rows:
        die(f"{path} holds no questions; give a JSONL file with one {{\"question\": ...}} per line")
    for n, row in rows:
        q, i, answer = row.get("question"), row.get("id"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            die(f"{path}:{n}: no \"question\" field (a non-empty string); every line needs one")
        if i is not None and (isinstance(i, bool) or not isinstance(i, (str, int))):
            die(f"{path}:{n}: \"id\" is {json.dumps(i)[:40]}; make it a string or an integer, or "
                "leave it out")
        if select == "sft" and not (isinstance(answer, str) and "####" in answer
                                    and final_number(answer.split("####")[-1]) is not None):
            die(f"{path}:{n}: --select sft checks answers against an \"answer\" field ending in "
                "\"#### <number>\" (GSM8K's form); add one to every line")
    questions = [dict(id=row["question"] if row.get("id") is None else row["id"],
                      question=row["question"], answer=row.get("answer")) for _, row in rows]
    return path, questions[:max_questions]

def compare_tokenizers(tok, tok_amateur):
    """The amateur reads the expert's ids, so the tokenizers must agree on the base vocabulary (ids
    below vocab_size); added tokens may differ (R1-Distill's, from 151643): compared id by id."""
    n_ids = max(len(tok), len(tok_amateur))
    names_E, names_A = (t.convert_ids_to_tokens(list(range(n_ids))) for t in (tok, tok_amateur))
    bad = next((i for i in range(tok.vocab_size) if names_E[i] != names_A[i]), None)
    if bad is not None:
        die(f"the expert's and amateur's tokenizers differ in their base vocabulary (id {bad}: "
            f"{names_E[bad]!r} vs {names_A[bad]!r}); LightReasoner compares distributions token by "
            "token, so pick two models of one family")
    differ = [i for i in range(tok.vocab_size, n_ids) if names_E[i] != names_A[i]]
    first = differ[0] if differ else None
    example = differ and f"id {first}: expert {names_E[first]!r} vs amateur {names_A[first]!r}"
    if differ and master:
        print(f"note: {len(differ)} added tokens differ between the tokenizers (ids {first}–"
              f"{differ[-1]}; {example}, ...); compared id by id, as the reference does",
              file=sys.stderr)
    return dict(base_vocab=tok.vocab_size, added_tokens_differ=len(differ), example=example or None)

def merge(out_dir):
    """Rank 0: part files (of any number of processes) into samples.jsonl and rollouts.jsonl in
    question order, the bytes one process writes; a question cut short by a kill is redone."""
    rollouts = merge_parts(os.path.join(out_dir, "rollouts.jsonl"), key=lambda r: r["index"])
    path = os.path.join(out_dir, "samples.jsonl")
    samples = merge_parts(path, key=lambda s: (s["index"], s.get("step", 0)))
    if any(i not in rollouts for i, _ in samples):
        write_jsonl(path, [s for (i, _), s in sorted(samples.items()) if i in rollouts])
    return rollouts

def save_question(paths, i, q, prompt, r, tok):
    """Question i's kept positions, a record each, then its rollout line (marks it done)."""
    ids, decode = r["completion_ids"], lambda token_ids: [tok.decode([a]) for a in token_ids]
    append_jsonl(paths[0], [dict(
        index=i, id=q["id"], question=q["question"], step=t, prefix=tok.decode(ids[:t]),
        prefix_ids=ids[:t], token_ids=V["token_ids"], tokens=decode(V["token_ids"]),
        weights=V["weights"], p_expert=V["p_expert"], p_amateur=V["p_amateur"], kl=r["kl"][t])
        for t, V in r["labels"].items()])
    append_jsonl(paths[1], [dict(
        index=i, id=q["id"], question=q["question"], prompt=tok.decode(prompt), completion=tok.decode(ids),
        completion_ids=ids, tokens=decode(ids), kl=r["kl"], kept=r["kept"])])
    return r["kept"]

def save_answer(paths, i, q, prompt, r, tok, stop_ids):
    """--select sft: question i's answer, kept whole if it ends (a stop token) on GSM8K's number."""
    ids, text = r["completion_ids"], tok.decode(r["completion_ids"])
    correct = bool(ids) and ids[-1] in stop_ids and is_correct(text, q["answer"])
    record = dict(index=i, id=q["id"], question=q["question"], answer=q["answer"].split("####")[-1].strip(),
                  pred=final_number(text), completion=text, completion_ids=ids)
    append_jsonl(paths[0], [record] if correct else [])
    append_jsonl(paths[1], [dict(record, prompt=tok.decode(prompt), correct=correct)])
    return ids if correct else []

def sample_all(questions, done, tok, expert_model, amateur_model, vocab, stop_ids):
    """This process's batches (k to rank k mod N) into its files -> tokens generated. Batches keep
    their boundaries, so resumed or parallel runs pad and round as one process does."""
    mine = [part_path(os.path.join(out_dir, f"{f}.jsonl")) for f in ("samples", "rollouts")]
    starts = range(0, len(questions), batch_size)
    my_batches = [range(s, min(s + batch_size, len(questions))) for s in starts][RANK::WORLD_SIZE]
    new_tokens = n_kept = kl_sum = 0  # this process, this run (the bar's postfix)
    mine_q = [i for b in my_batches for i in b]
    bar = tqdm(total=len(mine_q), initial=sum(i in done for i in mine_q), desc="sampling", unit="q",
               dynamic_ncols=True, disable=not master)
    try:
        for batch in [b for b in my_batches if not all(i in done for i in b)]:
            prompts = [chat_prompt_ids(tok, questions[i]["question"], system_prompt) for i in batch]
            results = sample_batch(expert_model, amateur_model, prompts, batch, tok.pad_token_id,
                                   stop_ids, vocab)
            for i, prompt, r in [x for x in zip(batch, prompts, results) if x[0] not in done]:
                kept = (save_answer(mine, i, questions[i], prompt, r, tok, stop_ids) if select == "sft"
                        else save_question(mine, i, questions[i], prompt, r, tok))
                new_tokens, n_kept = new_tokens + len(r["completion_ids"]), n_kept + len(kept)
                kl_sum += sum(r.get("kl", []))
                bar.update(1)
                bar.set_postfix(kept=n_kept, mean_kl=f"{kl_sum / max(new_tokens, 1):.3f}")
    except KeyboardInterrupt:
        bar.close()
        if master:
            print(f"interrupted: finished questions are saved in {out_dir}; run the same command "
                  "to resume", file=sys.stderr)
        raise SystemExit(130)
    except torch.cuda.OutOfMemoryError:
        bar.close()
        die(f"out of GPU memory with --batch-size {batch_size}; lower --batch-size (or --chunk, "
            f"now {chunk}) and run the same command: finished questions are kept", every_rank=True)
    bar.close()
    return new_tokens

def write_totals(n_questions, record, tokenizers, new_tokens, t_start, device):
    """Rank 0: the part files merged, then the totals of the whole run (resumed parts and all
    processes in, with the costs the efficiency table reads), the page and a one-line summary."""
    rollouts = merge(out_dir)
    assert sorted(rollouts) == list(range(n_questions)), "questions missing after sampling"
    spent = ((record or {}).get("totals") or {}).get("sampling_time_s", 0.0)  # by earlier runs
    rollouts = [rollouts[i] for i in range(n_questions)]
    kls = [k for r in rollouts for k in r.get("kl", [])]
    n_tokens, wall = sum(len(r["completion_ids"]) for r in rollouts), time.time() - t_start
    kept = [r for r in rollouts if r.get("kept") or r.get("correct")]  # questions that give records
    n_kept = sum(len(r["completion_ids"] if select == "sft" else r["kept"]) for r in kept)
    mean, median = (statistics.fmean(kls), statistics.median(kls)) if kls else (0.0, 0.0)
    totals = dict(questions=len(rollouts), generated_tokens=n_tokens, kept_positions=n_kept,
                  kept_fraction=n_kept / max(n_tokens, 1), mean_kl=mean, median_kl=median,
                  wall_time_s=wall, tokens_per_s=new_tokens / wall if wall > 0 else 0.0,
                  processes=WORLD_SIZE, batch_size=batch_size, questions_kept=len(kept),
                  sampling_time_s=spent + wall, device=device)
    finish_run(out_dir, "sample_config.json", totals, tokenizers=tokenizers)
    write_page(os.path.join(out_dir, "rollouts.html"),
               lambda: answers_page(out_dir) if select == "sft" else rollouts_page(out_dir))
    what = f"{len(kept)} right answers" if select == "sft" else f"mean KL {totals['mean_kl']:.3f}"
    print(f"sampled {len(rollouts)} questions, {n_tokens} tokens; kept {n_kept} positions "
          f"({100 * totals['kept_fraction']:.1f}%), {what}; {wall:.0f}s this run "
          f"({totals['tokens_per_s']:.1f} tokens/s) -> {os.path.join(out_dir, 'samples.jsonl')}, "
          f"{os.path.join(out_dir, 'rollouts.html')}")


# -----------------------------------------------------------------------------
# out/rollouts.html: a view of the three files above, rebuilt from them at the end of every run

CSS = """.q { border-top: 1px solid #ddd; } .h { color: #888; margin-bottom: 0; } i { font-style: normal; }
s { text-decoration: none; color: #999; } .c { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.c b { font-weight: normal; outline: 1px solid #333; position: relative; cursor: help; }
.c u { display: none; position: absolute; left: 0; top: 1.5em; z-index: 9; background: #fff;
       white-space: pre; border: 1px solid #888; padding: .3em .6em; text-decoration: none;
       box-shadow: 0 2px 6px #0003; }
.c b:hover u, .c b:focus u { display: block; } .c u::after { content: "\\A π_E, π_A, v_C, token"; color: #999; }
"""
LEVELS = 8  # steps of the KL colour scale

def visible(text, newline="\n"):
    """A token's text, escaped, control characters shown muted (↵ + `newline`, →, ␁ ...)."""
    mark = lambda c: {"\n": "↵", "\t": "→", "\x7f": "␡"}.get(c, chr(0x2400 + ord(c)))
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"<s>{mark(m[0])}</s>" + newline * (m[0] == "\n"),
                  esc(text))

def kl_histogram(kls, hi, beta, bins=50):
    """An inline SVG histogram of KL values on [0, hi] (the last bar holds all above), β marked."""
    counts = [0] * bins
    for k in kls:
        counts[min(bins - 1, int(k / hi * bins))] += 1
    top, x = max(counts) or 1, 8 * bins * min(beta / hi, 1)
    bars = "".join(f'<rect x="{8 * j}" y="{90 - 90 * n / top:.1f}" width="7" '
                   f'height="{90 * n / top:.1f}"/>' for j, n in enumerate(counts) if n)
    return (f'<svg width="{8 * bins + 20}" height="112" role="img" aria-label="histogram of KL">'
            f'<g fill="#c66">{bars}</g><line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="92" stroke="#000"/>'
            f'<text x="{x + 3:.1f}" y="10">β = {beta}</text><text x="0" y="106">0</text>'
            f'<text x="{8 * bins}" y="106" text-anchor="end">KL {hi:.2f}+</text></svg>')

def rollouts_page(out_dir):
    """Each completion token by token, shaded by KL(π_E‖π_A); a kept one shows its set V."""
    saved = peek_json(os.path.join(out_dir, "sample_config.json"))
    rollouts = peek_jsonl(os.path.join(out_dir, "rollouts.jsonl"))[0]
    labels = {(s["index"], s["step"]): s for s in peek_jsonl(os.path.join(out_dir, "samples.jsonl"))[0]}
    beta, kls = saved["config"]["beta"], sorted(k for r in rollouts for k in r["kl"])
    hi = max(2 * beta, kls[int(0.99 * (len(kls) - 1))] if kls else 0, 1e-3)  # the scale's top
    level = lambda k: min(LEVELS - 1, int(k / hi * LEVELS))  # noqa: E731
    css = CSS + "".join(f".k{j} {{ background: {heat((j + 0.5) / LEVELS * hi, hi)}; }}\n"
                        for j in range(LEVELS))
    n, n_kept, settings = len(kls), len(labels), {**saved["config"], **(saved.get("tokenizers") or {})}
    mean, median = (statistics.fmean(kls), statistics.median(kls)) if kls else (0, 0)
    head = (f"<p>{len(rollouts)} questions, {n} generated tokens, {n_kept} positions kept "
            f"({100 * n_kept / max(n, 1):.1f}%); KL mean {mean:.3f}, median {median:.3f}</p>"
            "<p class=h>" + " · ".join(f"{esc(k)}: {esc(v)}" for k, v in settings.items()) + "</p>"
            f"{kl_histogram(kls, hi, beta)}<p>Colour = KL(π_E‖π_A): "
            + " ".join(f"<i class=k{j}>{j * hi / LEVELS:.2f}</i>" for j in range(LEVELS))
            + " and up. Outlined: the kept positions; hover over or focus one (Tab) for its KL and "
            "plausible set V: π_E, π_A, v_C and token.</p>")
    blocks = []
    for r in rollouts:
        tokens = []
        for t, (text, k) in enumerate(zip(r["tokens"], r["kl"])):
            s = labels.get((r["index"], t))
            V = s and "".join(f"\n{pe:.3g} {pa:.3g} {w:.3g} {visible(a, '')}" for a, pe, pa, w
                              in zip(s["tokens"], s["p_expert"], s["p_amateur"], s["weights"]))
            tokens.append(f"<b class=k{level(k)} tabindex=0>{visible(text)}<u>KL {k:.3f}{V}</u></b>"
                          if s else f"<i class=k{level(k)}>{visible(text)}</i>")
        name = "" if r["id"] == r["question"] else f" · {esc(r['id'])}"
        blocks.append(f"<div class=q><p class=h>#{r['index']}{name} · {len(r['kept'])} of "
                      f"{len(r['kl'])} positions kept</p><p>{esc(r['question'])}</p>"
                      f"<p class=c>{''.join(tokens)}</p></div>\n")
    return page("LightReasoner stage 1: where the expert and the amateur differ", head + "".join(blocks), css)

def answers_page(out_dir):
    """--select sft: per question the expert's answer, its final number and GSM8K's, kept or not."""
    rollouts = peek_jsonl(os.path.join(out_dir, "rollouts.jsonl"))[0]
    blocks = [f"<div class=q><p class=h>#{r['index']} · {'kept' if r['correct'] else 'rejected'}: "
              f"ends on {esc(r['pred'])}, GSM8K says {esc(r['answer'])}</p><p>{esc(r['question'])}"
              f"</p><p class=c>{visible(r['completion'])}</p></div>\n" for r in rollouts]
    head = f"<p>{len(rollouts)} questions, {sum(r['correct'] for r in rollouts)} answers kept whole</p>"
    return page("SFT baseline: the expert's answers, checked against GSM8K", head + "".join(blocks), CSS)


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    globals().update(parse_flags({k: globals()[k] for k in config_keys}, __doc__))
    check_flags()
    dev = init_distributed(device)  # under torchrun: this process's GPU (or the CPU, with Gloo)
    batch_size = batch_size or (64 if dev.startswith("cuda") else 8)  # GPU time ~ N / batch decodes
    torch_dtype = pick_dtype(dtype, dev)
    torch.manual_seed(seed)
    questions_path, questions = load_questions()

    # ---- the models, compared on the ids both output layers have (Qwen pads its vocabularies to
    # different sizes); the SFT baseline (--select sft) needs no amateur
    tok = load_tokenizer(expert)
    tokenizers = None if select == "sft" else compare_tokenizers(tok, load_tokenizer(amateur))

    # ---- the run's record, before the first result: every setting that changes one (a batch pads
    # and rounds, a device computes), the questions file's fingerprint; the same record resumes
    run_config = {k: globals()[k] for k in ["expert", "amateur", "data", "max_questions", "max_new_tokens",
                                            "alpha", "beta", "select", "system_prompt", "seed", "batch_size"]}
    run_config.update(dtype=dtype_name(torch_dtype), amateur=None if select == "sft" else amateur,
                      device=dev.split(":")[0], inputs={questions_path: fingerprint(questions_path)})
    results = [p for f in ("samples", "rollouts") for p in glob.glob(glob.escape(out_dir) + f"/{f}.jsonl*")]
    record = start_run(out_dir, "sample_config.json", run_config, results, "sample", tokenizers=tokenizers)
    expert_model = load_model(expert, dev, torch_dtype)
    amateur_model = None if select == "sft" else load_model(amateur, dev, torch_dtype)
    vocab = min(m.get_output_embeddings().out_features for m in (expert_model, amateur_model) if m is not None)
    stop_ids = stop_token_ids(tok, expert_model)  # the expert's own end tokens

    # ---- sample what is not done; then the totals over all processes (the sum waits for them)
    if record is not None:  # a resume: fold in what a killed run left
        merge(out_dir)
    barrier()  # every process reads what rank 0 merged
    done = {r["index"] for r in complete_lines(os.path.join(out_dir, "rollouts.jsonl"))}
    t_start = time.time()
    new_tokens = sample_all(questions, done, tok, expert_model, amateur_model, vocab, stop_ids)
    new_tokens = sum_over_ranks([new_tokens], dev)[0]
    if master:
        write_totals(len(questions), record, tokenizers, new_tokens, t_start, device_name(dev))
    barrier()  # all processes end together, after rank 0's files (one leaving early aborts Gloo)
