"""Published results agree with their data: every results table under docs/results is regenerated
from the per-seed JSON committed beside it (tools/ablate.py --from-json), and every figure the
prose quotes from those tables (a mean ± deviation, a difference with its 95% interval, a
p-value) is one the regenerated tables contain."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from keras_irtf.training import ablation as A

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
EVIDENCE = sorted(p for p in RESULTS.glob("*.json") if "tables" in json.loads(p.read_text()))
# the pages whose prose quotes the current tables
PROSE = [ROOT / "README.md", ROOT / "docs" / "gradient-augmentation.md", RESULTS / "README.md",
         ROOT / "configs" / "css_ga.yaml", ROOT / "configs" / "css_fgsm.yaml"]

MEAN_SD = re.compile(r"[0-9]+(?:\.[0-9]+)? ± [0-9]+(?:\.[0-9]+)?")
INTERVAL = re.compile(r"[+-][0-9]+\.[0-9] \[[+-][0-9]+\.[0-9], [+-][0-9]+\.[0-9]\]")
P_VALUE = re.compile(r"\bp ?= ?([0-9.]+(?:e-[0-9]+)?)")


def _tables() -> str:
    return "\n".join(A.tables_markdown(json.loads(p.read_text()), source=str(p.relative_to(ROOT)))
                     for p in EVIDENCE)


def test_there_is_evidence_to_check():
    assert EVIDENCE, "no per-seed JSON under docs/results"
    for path in EVIDENCE:
        data = json.loads(path.read_text())
        about = data["about"]
        assert about["command"].startswith("python tools/ablate.py") and about["runs_finished"]
        for title, cells in data["tables"].items():
            assert cells, f"{path.name}: table {title!r} has no rows"
            for cell, entry in cells.items():
                seeds = [r["seed"] for r in entry["runs"]]
                assert len(seeds) == len(set(seeds)) >= 5, f"{path.name}: {cell} has seeds {seeds}"


@pytest.mark.parametrize("path", EVIDENCE, ids=lambda p: p.name)
def test_each_table_is_the_one_its_json_generates(path):
    page = path.with_suffix(".md")
    rel = str(path.relative_to(ROOT))
    assert page.is_file(), f"{rel} has no table page {page.name}"
    expected = A.tables_markdown(json.loads(path.read_text()), source=rel)
    assert page.read_text() == expected, (f"{page.relative_to(ROOT)} differs from its data; regenerate it: "
                                          f"python tools/ablate.py --from-json {rel} --table {page.relative_to(ROOT)}")


def test_every_current_results_table_has_its_data():
    for page in RESULTS.glob("*.md"):
        if "| loss | seeds |" in page.read_text():
            assert page.with_suffix(".json") in EVIDENCE, f"{page.name} is a results table without its per-seed JSON"


def _unmatched(text: str, tables: str) -> list:
    """The figures of `text` that `tables` does not hold."""
    p_values = set(re.findall(r"p=([0-9.]+(?:e-[0-9]+)?)", tables))
    found = [m for m in MEAN_SD.findall(text) + INTERVAL.findall(text) if m not in tables]
    return found + [f"p = {p}" for p in P_VALUE.findall(text) if p.rstrip(".") not in p_values]


def test_figures_quoted_in_prose_are_in_the_tables():
    tables = _tables()
    missing = [f"{page.relative_to(ROOT)}: {m}" for page in PROSE for m in _unmatched(page.read_text(), tables)]
    assert not missing, "figures in the prose that no table generated from docs/results/*.json holds:\n" + "\n".join(missing)


def test_the_prose_check_catches_a_figure_the_tables_do_not_hold():
    tables = "| L_CE | 5 | 33.0 ± 1.6 |\n| gaa | 5 | +13.5 [+11.5, +15.5] p=5e-05 | -0.8 [-2.5, +0.9] p=0.27 |"
    assert _unmatched("R@1 33.0 ± 1.6, +13.5 [+11.5, +15.5] (p = 5e-05), -0.8 [-2.5, +0.9], p = 0.27.", tables) == []
    assert _unmatched("R@1 33.1 ± 1.6; +13.5 [+11.5, +15.6]; p = 0.26", tables) == [
        "33.1 ± 1.6", "+13.5 [+11.5, +15.6]", "p = 0.26"]
