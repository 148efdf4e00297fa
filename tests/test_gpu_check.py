"""`make gpu-check` (tools/gpu_check.py) in its --dry-run: every part on the CPU with tiny shapes,
so the script a GPU machine runs cannot rot unnoticed; and its batch search on its own."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tools import gpu_check


def test_the_dry_run_writes_every_part_of_the_report(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu" and report["ok"] is True
    assert {"torch", "cuda", "device_name", "date", "budget_s", "seconds"} <= set(report)
    tests = report["tests"]
    assert tests["ok"] and tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0
    kinds = {(s["shape"], s["dtype"], s["kind"]) for s in report["steps"]}
    assert kinds == {(shape, dtype, kind) for shape in ("tiny-llama", "tiny-gpt2")
                     for dtype in ("float32", "bfloat16") for kind in ("hf", "masked")}
    assert all(s["seconds"] > 0 and s["peak_bytes"] >= 0 for s in report["steps"])
    assert {(r["shape"], r["dtype"]) for r in report["ratios"]} == {
        (s, d) for s, d, _ in kinds}
    assert all(r["time_ratio"] > 0 for r in report["ratios"])
    search = report["largest_batch"]
    assert search["dtype"] == "bfloat16" and search["limited_by"] in ("memory", "max_batch")
    assert search["largest_batch"] >= 1 and search["probes"][0]["batch"] == 1
    assert all(p["estimate_bytes"] > 0 for p in search["probes"])


@pytest.mark.parametrize(("limit", "max_batch", "expected"), [
    (37, 1024, (37, "memory")),
    (64, 64, (64, "max_batch")),
    (1000, 1024, (1000, "memory")),
    (0, 1024, (0, "memory")),
])
def test_the_batch_search_doubles_then_bisects(limit: int, max_batch: int,
                                               expected: tuple[int, str]) -> None:
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= limit

    assert gpu_check.search_largest(fits, max_batch, time.monotonic() + 60) == expected
    assert len(tried) == len(set(tried)) <= 2 * max_batch.bit_length()  # no batch twice
    if limit == 37:
        assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]


def test_the_batch_search_stops_when_its_time_is_spent() -> None:
    assert gpu_check.search_largest(lambda batch: True, 1024, time.monotonic() - 1) == (0, "time")
