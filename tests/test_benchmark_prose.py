"""Figures the documentation quotes from the benchmark reports are the reports' figures.

A page that links a generated benchmark report (docs/<name>.md, written by a script in
benchmarks/) may quote its measurements: a ratio ("1.79x", "3.5 times"), a time ("19.4 ms",
"19.2 s", "0.125 s/step"), a size ("0.85 GB") or a rate ("5 images a second"). Each such figure
on the page must be a number of one of the reports the page links, to the precision the page
gives (1.79x matches a report's 1.7912 or 1.79x). When a benchmark is measured again and its
report rewritten, a page that still quotes the old run fails here until its prose is updated.
The check is by value, not by place: a figure with few digits ("4x") is matched by any report
number that rounds to it, so it catches a stale figure reliably only when the figure is quoted
with the report's precision.

A figure that is not a measurement of a linked report (the paper's own figure, a goal, a
setting) is listed in NOT_MEASURED with the reason."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as C  # noqa: E402

# a number with a unit of measurement; not a size ("32 x 32 images") nor the spread of a mean
# ("32 ± 2.7 times")
FIGURE = re.compile(
    r"(?<![\w.])(?<!± )([0-9][0-9,]*(?:\.[0-9]+)?) ?"
    r"(x\b(?! ?[0-9])|times\b|ms\b|s/step\b|s\b|seconds\b|GB\b|MB\b|images a second\b)")
NUMBER = re.compile(r"(?<![\w.])[0-9][0-9,]*(?:\.[0-9]+)?")

# page -> {figure as written: why it is not a figure of a linked report}
NOT_MEASURED = {
    "docs/gradient-augmentation.md": {
        "1.73x": "the paper's own measurement of GA^A's cost",
    },
    "docs/large-galleries.md": {
        "2 ms": "the goal the benchmark tests against, not a measurement",
    },
    "docs/distributed-and-resuming.md": {
        "1,800 s": "the default of train.collective_timeout_seconds",
    },
    "configs/css_ga_study.yaml": {
        "1,775 s": "one study run's APGD evaluation time, from its run folder",
        "319 s": "the same run's training time",
    },
    "docs/results/README.md": {
        "20 s": "the delay between two workers' starts in a command, a setting",
        "32 times": "the GA study's noise-to-gradient norm ratio, from its tables",
    },
    "docs/vision-language.md": {
        "4x": "the Combiner's projection width, a setting",
        "8x": "the Combiner's hidden width, a setting",
    },
}


REPORTS = {p.name: p for p in DOCS.glob("*.md") if C.is_report(p.read_text())}
# the pages, and the configs whose comments quote a benchmark
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if p.name not in REPORTS),
         *sorted((ROOT / "configs").rglob("*.yaml"))]
# on a page, a link to a report ("(ga_overhead.md)", "(../ga_overhead.md)"); in a config's
# comments, the report's path ("docs/adversarial_training_cost.md")
LINK = re.compile(r"\]\((?:docs/|\.\./)?([A-Za-z0-9_]+\.md)\)")
MENTION = re.compile(r"\bdocs/([A-Za-z0-9_]+\.md)\b")


def _linked_reports(page: Path) -> list:
    names = set((LINK if page.suffix == ".md" else MENTION).findall(page.read_text()))
    return sorted({REPORTS[name] for name in names if name in REPORTS})


def _value(text: str) -> float:
    return float(text.replace(",", ""))


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _matches(figure: str, numbers: list) -> bool:
    """A report number that, rounded to the figure's precision, is the figure."""
    want, d = _value(figure), _decimals(figure)
    return any(abs(round(v, d) - want) < 1e-9 for v in numbers)


def unmatched(page_text: str, report_texts: list, allowed=()) -> list:
    """The figures of a page that none of its reports holds, as written ("1.79x")."""
    numbers = [_value(n) for text in report_texts for n in NUMBER.findall(text)]
    out = []
    for m in FIGURE.finditer(page_text):
        written = m.group(0)
        if written in allowed or _matches(m.group(1), numbers):
            continue
        out.append(written)
    return out


def _quoting_pages():
    return [p for p in PAGES if _linked_reports(p)]


def test_there_are_reports_and_pages_that_quote_them():
    assert len(REPORTS) >= 10, sorted(REPORTS)
    quoting = {str(p.relative_to(ROOT)) for p in _quoting_pages()}
    assert {"docs/gradient-augmentation.md", "docs/evaluation.md", "docs/demo.md"} <= quoting, quoting


@pytest.mark.parametrize("page", _quoting_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_benchmark_figures_are_in_the_linked_reports(page):
    rel = str(page.relative_to(ROOT))
    reports = _linked_reports(page)
    missing = unmatched(page.read_text(), [r.read_text() for r in reports], NOT_MEASURED.get(rel, {}))
    assert not missing, (f"{rel} quotes figures that none of the reports it links holds "
                         f"({', '.join(r.name for r in reports)}): {missing}; quote the report's current "
                         "figures, or list a figure that is not a measurement in NOT_MEASURED")


def test_every_exception_is_still_on_its_page():
    for rel, figures in NOT_MEASURED.items():
        text = (ROOT / rel).read_text()
        for figure in figures:
            assert figure in text, f"{rel}: NOT_MEASURED lists {figure!r}, which the page no longer has"


def test_the_check_catches_a_stale_figure():
    report = "| GA^A | 0.2123 | 1.79x |\n| PGD-10 | 0.507 | 7.20x |\nquery 19.43 ms, 3,201 images"
    assert unmatched("GA^A costs 1.79x, PGD-10 7.2x; 19.4 ms a query over 3,201 images", [report]) == []
    assert unmatched("GA^A costs 1.80x, PGD-10 6.03 times; 19.5 ms", [report]) == ["1.80x", "6.03 times", "19.5 ms"]
    assert unmatched("the paper's 1.73x", [report], {"1.73x": "the paper"}) == []
    # sizes and a mean's spread are not measurements of the report
    assert unmatched("32 x 32 images in 8 x 8 patches; 32 ± 2.7 times", [report]) == []
