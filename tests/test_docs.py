"""The documents stay a front door plus one place for each topic, and stay true to the repository.

README.md is small; every relative link in it and in docs/ reaches a file of the repository (and a
heading there, when it names one); no code cites design notes or issue numbers that live outside
the repository; docs/benchmarks.md and the README's benchmark table are what the generator makes
of bench/results/.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
CODE_ROOTS = ["engine", "storage", "service", "client", "bench", "tools", "tests", "deploy",
              "Dockerfile", "Makefile"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _gen():
    spec = importlib.util.spec_from_file_location("gen_bench_docs", ROOT / "tools" / "gen_bench_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (outside code blocks)."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            anchors.add("".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-"))
    return anchors


def test_readme_is_a_front_door() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size < 20_000, f"README.md is {size} bytes; move detail into docs/"


@pytest.mark.parametrize("doc", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists() or ROOT not in path.parents and path != ROOT:
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, f"{doc.name}: {broken}"


def test_every_doc_is_reachable_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [d.name for d in DOCS if f"docs/{d.name}" not in readme]
    assert not missing, f"README.md links none of {missing}"


def test_code_cites_nothing_outside_the_repository() -> None:
    # built from pieces, so this file does not match itself
    pattern = re.compile("|".join([r"DESIGN" + r"\.md", r"CONTRACT" + r"\.md",
                                   r"\bissue" + r"\s*#?\d+", "\u00a7"]), re.IGNORECASE)
    hits = []
    for root in CODE_ROOTS:
        base = ROOT / root
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        for path in files:
            if "__pycache__" in path.parts or "node_modules" in path.parts:
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_benchmark_docs_are_generated_from_the_results() -> None:
    assert _gen().main(["--check"]) == 0, "run: python tools/gen_bench_docs.py"


def test_generator_follows_the_results(tmp_path: Path) -> None:
    """A changed figure changes the page and the summary; an unknown results file still shows."""
    gen = _gen()
    results = tmp_path / "results"
    results.mkdir()
    forward = [{"bench": "forward", "shape": "smollm2-135m", "kind": "ratio", "threads": 2,
                "hf_seconds": 2.0, "masked_seconds": 1.5, "time_ratio": 0.75,
                "peak_mb_masked": 2800.0, "peak_mb_hf": 2100.0}]
    (results / "forward.jsonl").write_text("".join(json.dumps(r) + "\n" for r in forward))
    (results / "new-bench.jsonl").write_text(json.dumps({"metric": "widgets", "value": 7}) + "\n")
    page, block = gen.render(results)
    assert "| smollm2-135m | 2 | 1.5 | 2 | 0.75 |" in page
    assert "smollm2-135m 0.75x (2 threads)" in block
    assert "## new-bench" in page and "| widgets | 7 |" in page
    readme = f"intro\n{gen.BEGIN}\nold\n{gen.END}\nrest\n"
    assert gen.with_summary(readme, block) == f"intro\n{block}\nrest\n"
