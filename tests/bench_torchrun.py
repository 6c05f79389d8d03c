"""
Benchmark (not a test): wall time of each stage run as one process and under torchrun with N
processes, on the tiny test models (CPU, Gloo) or on whatever models you pass (a GPU machine).

    python tests/bench_torchrun.py                        # tiny models, 1 vs 2 processes, CPU
    python tests/bench_torchrun.py --nproc 1,2,4 --expert Qwen/Qwen2.5-Math-1.5B \\
        --amateur Qwen/Qwen2.5-0.5B --questions 256 --steps 100 --problems 256   # N GPUs

Each stage runs with the same flags at every N (sample: --questions questions; train: --steps
steps on what sample wrote; evaluate: --problems GSM8K-style problems, base model only), and the
outputs of N processes are checked against one process's (sample: byte-identical files; evaluate:
identical rows) so the timings compare the same work. Wall time includes start-up (imports, model
loading, joining the process group), as a user waits for it.
"""
import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import conftest  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--nproc", default="1,2", help="comma list of process counts (1 = plain python)")
parser.add_argument("--expert", default="", help="default: the tiny test expert")
parser.add_argument("--amateur", default="", help="default: the tiny test amateur")
parser.add_argument("--questions", type=int, default=48)
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--problems", type=int, default=32)
parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per process (0: cores / N)")
args = parser.parse_args()

tmp = tempfile.mkdtemp(prefix="bench_torchrun_")
expert, amateur = args.expert, args.amateur
if not expert:  # the tiny models of the tests
    tok = conftest.build_tokenizer(conftest.questions())
    eos = [tok.convert_tokens_to_ids("<|endoftext|>")]
    for name, vocab, hidden, layers, heads, seed in [("expert", len(tok) + 16, 64, 2, 4, 1),
                                                     ("amateur", len(tok) + 4, 32, 1, 2, 2)]:
        conftest.build_model(vocab, hidden, layers, heads, seed, eos).save_pretrained(os.path.join(tmp, name))
        tok.save_pretrained(os.path.join(tmp, name))
    expert, amateur = os.path.join(tmp, "expert"), os.path.join(tmp, "amateur")

# questions for sampling, and a GSM8K-format benchmark file for evaluation (answers are made up:
# only the timing matters here)
questions = (conftest.questions() * (args.questions // 12 + 1))[:args.questions]
with open(os.path.join(tmp, "questions.jsonl"), "w") as f:
    f.writelines(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(questions))
os.makedirs(os.path.join(tmp, "data", "gsm8k"))
with open(os.path.join(tmp, "data", "gsm8k", "test.jsonl"), "w") as f:
    problems = (conftest.questions() * (args.problems // 12 + 1))[:args.problems]
    f.writelines(json.dumps({"idx": i, "question": q, "answer": f"...\n#### {i}"}) + "\n" for i, q in enumerate(problems))


def run(nproc, script, *flags):
    """Wall time of one stage run as a user launches it."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    t = time.time()
    proc = subprocess.run(launch + [os.path.join(ROOT, script), *map(str, flags)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{script} with {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    return time.time() - t


rows = []
for n in [int(x) for x in args.nproc.split(",")]:
    out = os.path.join(tmp, f"out{n}")
    t_sample = run(n, "sample.py", "--expert", expert, "--amateur", amateur, "--data", os.path.join(tmp, "questions.jsonl"),
                   "--max-questions", args.questions, "--max-new-tokens", args.max_new_tokens, "--beta", 7 if not args.expert else 0.4,
                   "--batch-size", 8, "--out-dir", out)
    t_train = run(n, "train.py", "--out-dir", out, "--max-steps", args.steps, "--save-every", args.steps, "--lora-dropout", 0)
    t_eval = run(n, "evaluate.py", "--model", expert, "--adapter", "none", "--bench", "gsm8k", "--data-dir",
                 os.path.join(tmp, "data"), "--max-new-tokens", args.max_new_tokens, "--batch-size", 8, "--out-dir", out)
    rows.append((n, t_sample, t_train, t_eval))
    if n != rows[0][0]:  # the same work: outputs equal the first run's
        first = os.path.join(tmp, f"out{rows[0][0]}")
        for f in ("samples.jsonl", "rollouts.jsonl"):
            assert filecmp.cmp(os.path.join(first, f), os.path.join(out, f), shallow=False), f
        tag = os.path.basename(expert.rstrip("/"))
        assert open(os.path.join(first, "eval", tag, "gsm8k.jsonl")).read() == open(os.path.join(out, "eval", tag, "gsm8k.jsonl")).read()

print(f"{'processes':>9} {'sample.py':>10} {'train.py':>10} {'evaluate.py':>12}   (wall seconds, start-up included)")
for n, a, b, c in rows:
    print(f"{n:>9} {a:>10.1f} {b:>10.1f} {c:>12.1f}")
print(f"work: {args.questions} questions x {args.max_new_tokens} tokens; {args.steps} steps x 16 records; "
      f"{args.problems} problems x {args.max_new_tokens} tokens; files in {tmp}")
