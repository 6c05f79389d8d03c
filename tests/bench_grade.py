"""
How long does grading take? Builds a completions file of realistic model outputs (the benchmark's
own reference solutions ending in a \\boxed{} answer, in the forms models write: exact, decimal,
with units, wrong) and times `evaluate.py --completions` on it, end to end (not a test).

    python tests/bench_grade.py                                   # 1000 lines of olympiadbench
    python tests/bench_grade.py --bench math --n 1000 --data-dir data
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from evaluate import DATA_URL, download, last_boxed, parse_gt, read_jsonl  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--bench", default="olympiadbench")
parser.add_argument("--n", type=int, default=1000)
parser.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
parser.add_argument("--out-dir", default="/tmp/bench_grade")
args = parser.parse_args()

path = download(DATA_URL.format(args.bench), os.path.join(args.data_dir, args.bench, "test.jsonl"))
records = [(n - 1, r) for n, r in read_jsonl(path, "benchmark file", with_lines=True)]
random.seed(0)
lines = []
for i in range(args.n):
    line_no, r = records[i % len(records)]
    idx = r.get("idx", line_no)
    if args.bench == "gsm8k":
        body, answer = r["answer"].split("####")
        reasoning, answer = re.sub(r"<<.*?>>", "", body), answer.strip()
    elif args.bench in ("math", "minerva_math"):
        reasoning, answer = r["solution"].rsplit("\\boxed", 1)[0], last_boxed(r["solution"])
    elif args.bench == "olympiadbench":
        reasoning, answer = (r["solution"] or [""])[0], r["final_answer"][0].strip("$")
    else:
        reasoning, answer = "Let's think step by step.", str(parse_gt(r, args.bench))
    answer = random.choice([answer, answer, answer.replace("\\frac", "\\dfrac"), answer + "\\text{ units}",
                            "x = " + answer, re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), answer, count=1)])
    lines.append({"idx": idx, "completion": f"{reasoning}\n\nTherefore, the final answer is $\\boxed{{{answer}}}$."})

os.makedirs(args.out_dir, exist_ok=True)
completions = os.path.join(args.out_dir, f"bench_{args.bench}.jsonl")
with open(completions, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
t0 = time.time()
proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--bench", args.bench, "--completions",
                       completions, "--data-dir", args.data_dir, "--out-dir", args.out_dir], capture_output=True, text=True)
wall = time.time() - t0
print(proc.stdout.strip() or proc.stderr.strip().splitlines()[-1])
print(f"{len(lines)} completions of {args.bench} graded in {wall:.1f}s end to end "
      f"({len(lines) / wall:.0f} per second, including start-up) on {os.cpu_count()} CPU cores")
