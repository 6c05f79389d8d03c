"""
Benchmark (not a test): the three stages on a REAL expert/amateur pair, each run as the user runs it
(the stage's own __main__, in a process of its own), with wall time, peak memory and throughput,
and the ratios that hold across machines because both sides are measured in the same run:

- sample.py's whole run vs the expert's plain greedy generate of the same questions, batches and
  lengths (timed inside the same run), and where the rest of the time goes;
- evaluate.py's tokens written vs token-steps computed (batch rows x decode steps of every call):
  what left-padded static batching wastes on real completion lengths;
- train.py's records/s, and its packed forward passes vs one record per forward on the same records.

    python tests/bench_real.py --expert pair/expert --amateur pair/amateur
    python tests/bench_real.py --expert pair/expert --amateur pair/amateur --questions 16 \
        --data ../gsm8k/train.jsonl --eval 32 --data-dir ../data

Defaults: the test fixtures' GSM8K questions (tests/data), 8 train questions x 128 tokens, 8 steps of
4 records, 6 GSM8K test problems with at most 400 new tokens per call.
"""
import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT]  # the stages import common
parser = argparse.ArgumentParser()
parser.add_argument("--expert", required=True)
parser.add_argument("--amateur", required=True)
parser.add_argument("--data", default=os.path.join(HERE, "data", "gsm8k_train.jsonl"), help="GSM8K train JSONL")
parser.add_argument("--data-dir", default=os.path.join(HERE, "data", "eval"), help="holds gsm8k/test.jsonl")
parser.add_argument("--questions", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=128)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--eval", type=int, default=6, help="first N GSM8K test problems")
parser.add_argument("--eval-tokens", type=int, default=400)
parser.add_argument("--out-dir", default="", help="default: a fresh temporary directory")
parser.add_argument("--stage", default="", help=argparse.SUPPRESS)  # internal: run one stage in this process
args = parser.parse_args()


def timed_generate(counts):
    """Wrap transformers' generate (every model's) to add up its seconds, and the token-steps it computed
    (rows x new columns) and the tokens it wrote (each row up to its first stop token)."""
    from transformers import GenerationMixin
    plain = GenerationMixin.generate

    def generate(self, *a, **kw):
        t0 = time.perf_counter()
        out = plain(self, *a, **kw)
        counts["generate_s"] += time.perf_counter() - t0
        new = out[:, kw["input_ids"].shape[1]:].tolist()
        stops = set(kw["generation_config"].eos_token_id)
        counts["computed"] += len(new) * len(new[0]) if new else 0
        counts["written"] += sum(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in new)
        return out
    GenerationMixin.generate = generate


def run_stage(stage, argv):
    """The stage script's own __main__ in this process, with generate timed; -> its counts."""
    import torch
    counts = dict(generate_s=0.0, computed=0, written=0, teacher_forced_s=0.0)
    timed_generate(counts)
    if stage == "sample":  # the amateur's teacher-forced pass: the decoder run without the KV cache
        from transformers.models.qwen2 import modeling_qwen2
        forward = modeling_qwen2.Qwen2Model.forward

        def decoder(self, *a, **kw):
            t0 = time.perf_counter()
            out = forward(self, *a, **kw)
            if kw.get("use_cache") is False:  # generate's own steps run with the cache
                counts["teacher_forced_s"] += time.perf_counter() - t0
            return out
        modeling_qwen2.Qwen2Model.forward = decoder
    sys.argv = [f"{stage}.py", *argv]
    t0 = time.perf_counter()
    runpy.run_path(os.path.join(ROOT, f"{stage}.py"), run_name="__main__")
    counts["wall_s"] = time.perf_counter() - t0
    counts["threads"] = torch.get_num_threads()
    return counts


def packing(out):
    """train.py's packed passes vs one record per forward, forward + backward, on up to 32 records."""
    import torch
    import train
    from common import load_model, load_tokenizer, read_json
    from peft import LoraConfig, get_peft_model
    records, official = train.read_samples(os.path.join(out, "samples.jsonl"))
    records = records[:32]
    system = read_json(os.path.join(out, "sample_config.json"))["config"]["system_prompt"]
    tok = load_tokenizer(args.expert)
    model = get_peft_model(load_model(args.expert, "cpu", torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    pairs = [(train.input_ids(tok, r, system, official), (r["token_ids"], r["weights"])) for r in records]
    by_question = {}
    for r, pair in zip(records, pairs):
        by_question.setdefault(r["question"], []).append(pair)
    result = {}
    train.soft_label_kl(model, [pairs[0][0]], [pairs[0][1]], tok.pad_token_id)  # warm-up
    for name, groups in (("one record per forward", [[p] for p in pairs]), ("packed", list(by_question.values()))):
        t0, loss = time.perf_counter(), 0.0
        for g in groups:
            kl, _ = train.soft_label_kl(model, [x for x, _ in g], [y for _, y in g], tok.pad_token_id)
            kl.sum().backward()
            loss += kl.sum().item()
        result[name] = dict(records_per_s=len(pairs) / (time.perf_counter() - t0), passes=len(groups), loss=loss)
    return result


def child(stage, out):
    """Run one stage in a new process (this script again); -> (its counts, wall s, peak RSS GiB)."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--stage", stage, "--out-dir", out]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    text = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"bench_real: the {stage} stage failed (status {status})")
    return json.loads(text.strip().splitlines()[-1]), time.perf_counter() - t0, usage.ru_maxrss / 2**20


if __name__ == "__main__" and args.stage:
    o = args.out_dir
    argv = {"sample": ["--expert", args.expert, "--amateur", args.amateur, "--data", args.data,
                       "--max-questions", args.questions, "--max-new-tokens", args.max_new_tokens, "--out-dir", o],
            "train": ["--out-dir", o, "--max-steps", args.steps, "--batch-size", 4, "--grad-accum", 1,
                      "--save-every", args.steps],
            "evaluate": ["--bench", "gsm8k", "--limit", args.eval, "--max-new-tokens", args.eval_tokens,
                         "--adapter", "none", "--data-dir", args.data_dir, "--out-dir", o]}
    counts = packing(o) if args.stage == "packing" else run_stage(args.stage, list(map(str, argv[args.stage])))
    print(json.dumps(counts))
elif __name__ == "__main__":
    out = args.out_dir or tempfile.mkdtemp(prefix="bench_real.")
    print(f"{args.expert} / {args.amateur}; files in {out}")
    s, s_wall, s_mem = child("sample", out)
    totals = json.load(open(os.path.join(out, "sample_config.json")))["totals"]
    loop = totals["wall_time_s"]  # sample.py's own clock: the questions' loop, loading excluded
    rest = loop - s["generate_s"] - s["teacher_forced_s"]
    print(f"sample:   {s_wall:6.0f} s in all, peak {s_mem:.1f} GiB, loading {s['wall_s'] - loop:.0f} s; the run "
          f"{loop:.0f} s = generate {s['generate_s']:.0f} s + teacher-forced passes {s['teacher_forced_s']:.0f} s"
          f" + the rest {rest:.0f} s (lm_heads, contrast, files, page)")
    print(f"          {totals['generated_tokens']} tokens, {totals['generated_tokens'] / loop:.2f} tokens/s; "
          f"run / plain generate = {loop / s['generate_s']:.2f}x; kept {totals['kept_positions']} "
          f"({100 * totals['kept_fraction']:.1f}%), KL mean {totals['mean_kl']:.3f}, "
          f"median {totals['median_kl']:.4f}")
    t, t_wall, t_mem = child("train", out)
    trained = json.load(open(os.path.join(out, "train_config.json")))["totals"]
    print(f"train:    {t_wall:6.0f} s in all, peak {t_mem:.1f} GiB, loading {t['wall_s'] - trained['wall_time_s']:.0f} s; "
          f"{args.steps} steps x 4 records in {trained['wall_time_s']:.0f} s = "
          f"{4 * args.steps / trained['wall_time_s']:.3f} records/s")
    p, _, _ = child("packing", out)
    one, packed = p["one record per forward"], p["packed"]
    same = abs(packed["loss"] - one["loss"]) <= 1e-3 * max(1.0, abs(one["loss"]))
    print(f"          packed {packed['records_per_s']:.2f} records/s ({packed['passes']} passes) vs one "
          f"record per forward {one['records_per_s']:.2f} ({one['passes']} passes): "
          f"{packed['records_per_s'] / one['records_per_s']:.1f}x, same loss: {same}")
    e, e_wall, e_mem = child("evaluate", out)
    waste = 1 - e["written"] / max(e["computed"], 1)
    print(f"evaluate: {e_wall:6.0f} s in all, peak {e_mem:.1f} GiB; {e['written']} tokens written in "
          f"{e['generate_s']:.0f} s of generate ({e['written'] / e['generate_s']:.2f} tokens/s); "
          f"{e['computed']} token-steps computed: {100 * waste:.0f}% of them padding")
