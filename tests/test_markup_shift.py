"""`bench/markup_shift.py`'s texts and figures, on a tiny random reward model and a few real reviews (no
training): the cases' texts are what they claim, a text without markup shifts by exactly zero, and the
report's figures are those of the per-text differences. The real-review tests skip when `../shared/data`
is absent."""

from __future__ import annotations

import json
import random
import statistics

import pytest

import utils
from bench import markup_shift
from tests.tiny import save_tiny_reward

MISSING = None if markup_shift.SHARED_DATA.exists() else f"not found: {markup_shift.SHARED_DATA}"
needs_data = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def real_rows(n: int = 24) -> list[dict]:
    """The first `n` reviews of the shared file, raw."""
    lines = markup_shift.SHARED_DATA.read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_snippet_and_insert_break():
    text = 'A fine film, \\"truly\\" moving.<br /><br />The cast is great and the ending works well.'
    cut = markup_shift.snippet(text, 10)
    assert text.startswith(cut) and "<br /><br />The" in cut and cut != text  # past the break, then a word
    assert markup_shift.snippet(text, 1000) == text
    plain = "one two three four five"
    rng = random.Random(0)
    for _ in range(20):
        marked = markup_shift.insert_break(plain, rng)
        assert marked.count("<br /><br />") == 1 and utils.clean_review(marked) == plain
    assert utils.clean_review(markup_shift.unescape_quotes(text)) == utils.clean_review(text)


def test_shift_stats_by_hand():
    s = markup_shift.shift_stats([1.0, -0.5, 2.0, 0.0], [0.5, 0.5, 2.0, -1.0], gap=2.0, midpoint=0.75)
    d = [0.5, -1.0, 0.0, 1.0]
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.125) and s["mean_abs"] == pytest.approx(0.625)
    assert s["median_abs"] == pytest.approx(0.75) and s["max_abs"] == 1.0
    half = 1.96 * statistics.stdev(d) / 2
    assert s["ci95"] == pytest.approx([0.125 - half, 0.125 + half])
    assert s["sign_flips"] == 1 / 4  # -0.5 against 0.5 (0.0 against -1.0: both <= 0, no flip)
    assert s["midpoint_flips"] == 1 / 4  # about 0.75: 1.0 against 0.5
    assert s["mean_abs_over_gap"] == pytest.approx(0.3125) and s["mean_over_gap"] == pytest.approx(0.0625)


@needs_data
def test_cases_on_real_reviews():
    rows = real_rows()
    cases = markup_shift.markup_cases(rows, 400)
    with_breaks = [r for r in rows if "<br" in r["text"]]
    without = [r for r in rows if "<br" not in r["text"]]
    assert with_breaks and without
    assert len(cases["breaks, whole"]) == len(cases["breaks, snippet"]) == len(with_breaks)
    assert len(cases["inserted, whole"]) == len(cases["inserted, snippet"]) == len(without)
    for t in cases["breaks, snippet"] + cases["inserted, snippet"] + cases["inserted, whole"]:
        assert "<br />" in t
    assert all('\\"' not in t for t in cases["breaks, whole"])  # only the breaks differ from the cleaned
    # the control cleans back to the review it was made from
    assert [utils.clean_review(t) for t in cases["inserted, whole"]] == [
        utils.clean_review(r["text"]) for r in without
    ]


@needs_data
def test_measure_on_a_tiny_reward_model(tmp_path):
    model, tok = utils.load_reward_model(save_tiny_reward(tmp_path / "rm"))
    rows = real_rows()
    score = lambda texts: utils.score_texts(model, tok, texts, 16, 128).tolist()

    # texts without markup: scored as they are and cleaned, the shift is exactly zero
    plain = [utils.clean_review(r["text"]) for r in rows]
    zero = markup_shift.shift_stats(score(plain), score([utils.clean_review(t) for t in plain]), 1.0, 0.0)
    assert zero["mean"] == zero["mean_abs"] == zero["max_abs"] == zero["sign_flips"] == 0.0

    report = markup_shift.measure(model, tok, rows, 400, 16, 128)
    r_all = score(plain)
    pos = [r for r, row in zip(r_all, rows, strict=True) if row["label"] == 1]
    neg = [r for r, row in zip(r_all, rows, strict=True) if row["label"] == 0]
    gap = statistics.fmean(pos) - statistics.fmean(neg)
    assert report["heldout"]["gap"] == pytest.approx(gap)
    for name, texts in markup_shift.markup_cases(rows, 400).items():
        r_markup, r_clean = score(texts), score([utils.clean_review(t) for t in texts])
        d = [a - b for a, b in zip(r_markup, r_clean, strict=True)]
        s = report["cases"][name]
        assert s["n"] == len(texts)
        assert s["mean"] == pytest.approx(statistics.fmean(d), abs=1e-6)  # the mean of the differences
        assert s["mean_abs"] == pytest.approx(statistics.fmean(abs(x) for x in d), abs=1e-6)
        assert s["median_abs"] == pytest.approx(statistics.median(abs(x) for x in d), abs=1e-6)
        assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
        assert s["mean_over_gap"] == pytest.approx(s["mean"] / gap)
        assert s["mean_abs"] > 0  # the tiny model sees the markup (as [UNK] and punctuation)


@needs_data
def test_main_with_a_given_model_writes_the_page(tmp_path):
    rm = save_tiny_reward(tmp_path / "rm")
    args = ["--model", rm, "--heldout", "20", "--max-length", "128"]
    args += ["--out", str(tmp_path / "work"), "--docs", str(tmp_path / "docs")]
    result = markup_shift.main(args)
    saved = json.loads((tmp_path / "docs" / "markup_shift.json").read_text())
    assert saved["cases"] == result["cases"] and saved["heldout"]["reviews"] == 20
    assert saved["command"].startswith("python bench/markup_shift.py --model") and saved["date"]
    assert saved["machine"].startswith("Machine: ")
    page = (tmp_path / "docs" / "markup_shift.md").read_text()
    assert "| case | n |" in page and "inserted, whole" in page


def test_skips_without_data(tmp_path, capsys):
    assert markup_shift.main(["--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "w")]) == {}
    assert "skipped" in capsys.readouterr().out
