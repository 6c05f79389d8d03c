"""
evaluate.py's pages, built from rows files of known content and read back with html.parser:
report.html's views and their counts, <bench>.html's every problem, escaping, the bidi guard, and
damaged files that cost a note, never the page.
"""
import html.parser
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, ROOT)
import evaluate as E  # noqa: E402

EVIL = "<script>alert(1)</script><img src=x onerror=alert(2)>"


class Page(html.parser.HTMLParser):
    """Every element of a page in document order: (tag, attrs, its whole text)."""
    VOID = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self, text):
        super().__init__()
        self.elements, self.open, self.text = [], [], []
        self.feed(text)
        self.elements = [(tag, attrs, "".join(self.text[start:end])) for tag, attrs, start, end in self.elements]

    def handle_starttag(self, tag, attrs):
        self.elements.append([tag, dict(attrs), len(self.text), None])
        if tag not in self.VOID:
            self.open.append(self.elements[-1])

    def handle_endtag(self, tag):
        while self.open and self.open[-1][0] != tag:  # an element left open ends with its parent
            self.open.pop()[3] = len(self.text)
        if self.open:
            self.open.pop()[3] = len(self.text)

    def handle_data(self, data):
        self.text.append(data)

    def problems_under(self, heading="h3"):
        """{heading text: [idx of each problem after it]}, problems being <details> whose summary says 'idx N'."""
        out, current = {}, None
        for tag, _, text in self.elements:
            if tag == heading:
                current = out.setdefault(text, [])
            elif tag == "summary" and text.startswith("idx ") and current is not None:
                current.append(int(text.split()[1]))
        return out


def write_run(eval_dir, tag, verdicts, extra=None, damaged=""):
    """A model's gsm8k rows (idx 0, 1, ...) and summary; extra: {idx: fields to set}."""
    os.makedirs(eval_dir / tag)
    rows = [dict(idx=i, question=f"{EVIL} question {i}", gt=str(i), completion=f"so \\boxed{{{i}}}", pred=str(i),
                 correct=ok, rounds=0, timed_out=False, cut_off=False) for i, ok in enumerate(verdicts)]
    for i, fields in (extra or {}).items():
        rows[i].update(fields)
    (eval_dir / tag / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + damaged)
    n, correct = len(rows), sum(verdicts)
    (eval_dir / tag / "summary.json").write_text(json.dumps({"gsm8k": dict(n=n, correct=correct,
                                                                             accuracy=round(100 * correct / n, 2))}))


COMPLETION = f"{EVIL} first\n```python\nprint('<b>')\n```\n```output\n<b>\n```\nso \\boxed{{\u202e81}}"
VIEWS = {"m right → m+lora wrong": [1], "m wrong → m+lora right": [2], "wrong for every model": [3, 4],
         "grading timed out": [4], "cut off at the token limit": [3, 5]}


def test_report_and_benchmark_page_hold_each_view_with_its_count_escaped(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "SHOWN", 1)  # report.html shows the first problem of each view, the rest by count
    write_run(tmp_path, "m", [True, True, False, False, False, True], {3: dict(cut_off=True)})
    path = tmp_path / "m" / "gsm8k.jsonl"  # rows as written before cut_off was recorded: no such field
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "cut_off" or v}) + "\n" for r in rows))
    tuned = {1: dict(completion=COMPLETION, pred="\u202e81", rounds=1), 4: dict(timed_out=True), 5: dict(cut_off=True)}
    write_run(tmp_path, "m+lora", [True, False, True, False, False, True], tuned, damaged="{\"idx\": 9, \"corr\nbad\n")
    text = E.report_page(str(tmp_path))
    report = Page(text)
    shown = report.problems_under()
    assert shown == {f"gsm8k, {v}: {len(ids)}": ids[:1] for v, ids in VIEWS.items()}
    assert [t for tag, _, t in report.elements if tag == "p" and t.startswith("… and")] == \
        ["… and 1 more in gsm8k.html", "… and 1 more in gsm8k.html"]
    words = "".join(report.text)
    assert "gsm8k.jsonl: 2 damaged line(s) left out" in words and "50.0 +0.0" in words.replace("\n", " ")

    every = Page((tmp_path / "gsm8k.html").read_text(encoding="utf-8"))
    anchors, links, heading = {}, {}, None  # anchors: a problem's id -> its idx
    for (tag, a, t), (next_tag, _, next_text) in zip(every.elements, every.elements[1:]):
        if tag == "details" and "id" in a and next_tag == "summary":
            anchors[a["id"]] = int(next_text.split()[1])
    assert sorted(anchors.values()) == [0, 1, 2, 3, 4, 5]  # every problem, once
    for tag, a, t in every.elements:
        heading = t if tag == "h3" else heading
        if tag == "a" and a.get("href", "").startswith("#p") and heading:
            links.setdefault(heading, []).append(anchors[a["href"][1:]])
    assert links == {f"{v}: {len(ids)}": ids for v, ids in VIEWS.items() if ids}

    for page, raw in ((report, text), (every, (tmp_path / "gsm8k.html").read_text(encoding="utf-8"))):
        tags = [(tag, a) for tag, a, _ in page.elements]
        assert not [t for t, _ in tags if t in ("script", "img", "link", "iframe")]
        assert not any(k.startswith("on") or k == "src" for _, a in tags for k in a)  # no handlers, nothing fetched
        assert all(not a.get("href", "#").startswith(("http", "//")) for _, a in tags)  # works offline
        assert not any("open" in a for t, a in tags if t == "details")  # collapsed until clicked
        assert "\u202e" not in raw and "[U+202E]81" in raw
    pres = [t for tag, _, t in every.elements if tag == "pre"]
    assert COMPLETION.replace("\u202e", "[U+202E]") in pres  # the completion, whole, as text
    assert {a.get("class") for tag, a, _ in every.elements if tag == "span"} >= {"python", "output", "ans"}
    head = next(t for tag, _, t in every.elements if tag == "summary" and t.startswith("idx 1 "))
    assert head == "idx 1 · ground truth 1 · m 1 right · m+lora [U+202E]81 wrong"


def test_a_damaged_summary_or_missing_rows_file_costs_a_note_not_the_page(tmp_path):
    write_run(tmp_path, "m", [True, False])
    write_run(tmp_path, "m+lora", [False, False])
    (tmp_path / "m+lora" / "summary.json").write_text('{"gsm8k": {"n": 2, "acc')
    os.makedirs(tmp_path / "x")
    (tmp_path / "x" / "summary.json").write_text(json.dumps({"gsm8k": dict(n=2, correct=0, accuracy=0.0)}))
    page = Page(E.report_page(str(tmp_path)))
    words = "".join(page.text)
    assert "summary.json is damaged; m+lora is left out" in words and "x/gsm8k.jsonl cannot be read" in words
    assert [t for tag, _, t in page.elements if tag == "th"] == ["benchmark", "m", "x"]
    assert "gsm8k, wrong for every model: 1" in words  # m's rows alone
