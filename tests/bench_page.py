"""
The evaluation pages at full size: MATH's 5,000 problems x 2 models (base, base+lora), completions of
about 1,500 characters with a code round in some, as synthetic rows files. Times report_page (which
writes report.html and math.html), prints both sizes, and times headless Chromium drawing each page
when it is installed (apt-get install chromium).

    python tests/bench_page.py                 # 5,000 problems in a temporary directory
    python tests/bench_page.py --n 1000 --keep /tmp/pages
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as E  # noqa: E402


def completion(rng, answer, code):
    """About 1,500 characters of step-by-step text ending in a boxed answer, with a program and its output."""
    steps = [f"Step {k}: multiply {rng.randint(2, 99)} by {rng.randint(2, 99)} and subtract "
             f"{rng.randint(1, 500)}, which leaves \\frac{{{rng.randint(1, 9)}}}{{{rng.randint(2, 9)}}} of the total."
             for k in range(1, 16)]
    program = "\n```python\nfrom sympy import Rational\nx = Rational(3, 4) * 24\nprint(x)\n```\n```output\n18\n```\n"
    return "Let us reason step by step.\n" + "\n".join(steps) + (program if code else "") + f"\nSo \\boxed{{{answer}}}."


def write_rows(eval_dir, n, rng):
    for tag, p in (("Qwen2.5-Math-1.5B", 0.72), ("Qwen2.5-Math-1.5B+lora", 0.76)):
        os.makedirs(os.path.join(eval_dir, tag))
        rows = []
        for i in range(n):
            gt, ok, code = str(rng.randint(1, 999)), rng.random() < p, rng.random() < 0.1
            pred = gt if ok else str(rng.randint(1, 999))
            question = f"Problem {i}: a shop sells {rng.randint(2, 50)} boxes of pencils. " * 6
            rows.append(dict(idx=i, question=question, gt=gt, completion=completion(rng, pred, code), pred=pred,
                             correct=ok, rounds=int(code), timed_out=rng.random() < 0.002, cut_off=rng.random() < 0.03))
        with open(os.path.join(eval_dir, tag, "math.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        correct = sum(r["correct"] for r in rows)
        summary = {"math": dict(n=n, correct=correct, accuracy=round(100 * correct / n, 2))}
        with open(os.path.join(eval_dir, tag, "summary.json"), "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--keep", default="", help="write the pages here and keep them")
    args = parser.parse_args()
    eval_dir = args.keep or tempfile.mkdtemp()
    write_rows(eval_dir, args.n, random.Random(0))
    t = time.time()
    E.write_page(os.path.join(eval_dir, "report.html"), lambda: E.report_page(eval_dir))
    print(f"report_page (report.html and math.html): {time.time() - t:.2f} s")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    with open(os.path.join(eval_dir, "blank.html"), "w") as f:  # Chromium's own start and exit, for scale
        f.write("<!doctype html><p>blank</p>")
    for name in ("blank.html", "report.html", "math.html"):
        path = os.path.join(eval_dir, name)
        line = f"{name}: {os.path.getsize(path) / 1e6:.2f} MB"
        if browser:
            t = time.time()
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={path}.png",
                            "--window-size=1280,2000", "file://" + path], capture_output=True, timeout=300)
            line += f", headless Chromium draws it in {time.time() - t:.1f} s"
        print(line)
    if not args.keep:
        shutil.rmtree(eval_dir)
