"""benchmarks/distributed.py, recall section: the paired t-test it reports and the page it writes
from the per-seed .json (no training here)."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "distributed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_distribution_against_closed_forms(bench):
    for t in (0.1, 0.5, 1.0, 2.0, 4.3, 12.0):
        assert bench.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)  # Cauchy
        assert bench.t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert bench.t_two_sided_p(1.959964, 10**7) == pytest.approx(0.05, abs=1e-5)  # the normal limit
    assert bench.t_critical(2) == pytest.approx(4.302653, abs=1e-5)  # tables of Student's t, 97.5% quantile
    assert bench.t_critical(10) == pytest.approx(2.228139, abs=1e-5)


def test_paired_t_test(bench):
    r = bench.paired_t_test([1.0, 2.0, 3.0])
    assert (r["mean"], r["sd"], r["df"]) == (2.0, 1.0, 2)
    assert r["t"] == pytest.approx(2 * math.sqrt(3))
    assert r["p"] == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14))
    assert r["interval"] == pytest.approx([2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)], abs=1e-5)
    assert bench.paired_t_test([0.0, 0.0, 0.0])["p"] == 1.0
    assert bench.paired_t_test([0.5, 0.5, 0.5])["p"] == 0.0
    with pytest.raises(ValueError):
        bench.paired_t_test([1.0])


def _record(one, mirrored):
    def run(r1, r10, replicas):
        return {"test": {"R@1": r1, "R@10": r10}, "replicas": replicas}

    return {
        "command": "python benchmarks/distributed.py --recall-only --recall-seeds 3", "date": "2000-01-01 00:00 UTC",
        "config": "configs/css.yaml", "dataset_size": "small", "test_queries": 2400, "steps": 800, "image_size": 32,
        "batch_size": 64, "complete": True, "wall_seconds": 900.0, "load_1min": {"before": 2.0, "samples": [2.0, 3.0]},
        "machine": {"logical_cpus": 2, "cpu": "CPU"},
        "seeds": [{"seed": i, "one_device": run(*o, 1), "mirrored": run(*m, 2)}
                  for i, (o, m) in enumerate(zip(one, mirrored))],
    }


def test_the_section_shows_every_seed_and_the_test(bench):
    r = _record([(0.50, 0.90), (0.54, 0.92), (0.46, 0.88)], [(0.51, 0.90), (0.53, 0.93), (0.47, 0.875)])
    st = bench.recall_stats(r["seeds"])
    assert st["R@1"]["difference"] == pytest.approx([1.0, -1.0, 1.0])
    assert st["R@1"]["seed_sd_one_device"] == pytest.approx(4.0)
    text = "\n".join(bench.recall_markdown(r))
    for row in ("| 0 | 50.00 | 51.00 | +1.00 | 90.00 | 90.00 | +0.00 |",
                "| 1 | 54.00 | 53.00 | -1.00 | 92.00 | 93.00 | +1.00 |",
                "| 2 | 46.00 | 47.00 | +1.00 | 88.00 | 87.50 | -0.50 |"):
        assert row in text
    p1, p10 = st["R@1"]["test"]["p"], st["R@10"]["test"]["p"]
    assert f"p = {p1:.2f} for R@1 and p = {p10:.2f} for R@10 (2 degrees of freedom)" in text
    assert "neither difference is significant" in text
    assert "No seed's difference is larger than the seed-to-seed standard deviation" in text

    shifted = _record([(0.50, 0.90), (0.54, 0.92), (0.46, 0.88)], [(0.60, 0.95), (0.65, 0.96), (0.55, 0.94)])
    text = "\n".join(bench.recall_markdown(shifted))
    assert "the difference is significant for R@1 and R@10" in text
    assert "No seed's difference" not in text


def test_the_section_replaces_itself_and_keeps_the_page(bench):
    page = "# Title\n\nbody\n\n## Machine\n\n| | |\n"
    first = "\n".join(bench.recall_markdown(_record([(0.5, 0.9)] * 2, [(0.5, 0.9)] * 2)))
    once = bench.replace_recall_section(page, first)
    assert once.index("body") < once.index(bench.RECALL_BEGIN) < once.index("## Machine")
    second = "\n".join(bench.recall_markdown(_record([(0.5, 0.9)] * 3, [(0.5, 0.9)] * 3)))
    twice = bench.replace_recall_section(once, second)
    assert twice.count(bench.RECALL_BEGIN) == 1 and "over 3 seeds" in twice and "over 2 seeds" not in twice
    assert twice.replace(second, "") == once.replace(first, "")
