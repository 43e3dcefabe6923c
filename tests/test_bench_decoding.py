"""Smoke test of the decoding benchmark (`bench/decoding.py`): every method is timed, the report files
agree, and the compiled loop drew the eager loop's tokens; speed itself is never asserted."""

from __future__ import annotations

import json
import math

from bench import decoding


def test_decoding_benchmark_times_each_method_and_compares_the_draws(tmp_path):
    report = decoding.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "decoding.json").read_text()) == json.loads(json.dumps(report))
    markdown = (tmp_path / "decoding.md").read_text()
    print("\n" + markdown)
    (row,) = report["results"]
    assert f"| {row['model']} | 4 |" in markdown
    for method in decoding.METHODS:
        assert math.isfinite(row[method]["ms_per_token"]) and row[method]["ms_per_token"] > 0, method
        assert row[method]["first_call_s"] > 0, method
    assert row["compiled_draws_eager_tokens"] and row["first_difference_at"] is None  # fp32, the same seed
