"""benchmarks/run_all.py: runs every script present, passes --quick, tolerates failures and
scripts without --quick, and writes the summary report."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.fixture
def fake_suite(tmp_path, monkeypatch):
    import _common as C
    import run_all

    folder = tmp_path / "benchmarks"
    folder.mkdir()
    docs = tmp_path / "docs"
    (folder / "alpha.py").write_text(
        "import sys, pathlib\n"
        "quick = '--quick' in sys.argv\n"
        f"pathlib.Path({str(docs)!r}).mkdir(exist_ok=True)\n"
        f"pathlib.Path({str(docs)!r}, 'alpha.md').write_text('report')\n"
        "print('noise')\n"
        "print('=== SUMMARY alpha ===')\n"
        "print(f'ratio 12.5x quick={quick}')\n"
        "print('args ' + ' '.join(sys.argv[1:]))\n"
        "print('=== END SUMMARY ===')\n"
    )
    (folder / "broken.py").write_text("import sys\nprint('starting')\nsys.exit('could not find the data')\n")
    (folder / "plain.py").write_text(
        "import argparse\nargparse.ArgumentParser().parse_args()\nprint('plain result 3.0x')\n")
    (folder / "_helper.py").write_text("raise SystemExit('helpers are not benchmarks')\n")
    monkeypatch.setattr(run_all, "HERE", folder)
    monkeypatch.setattr(C, "DOCS", docs)
    monkeypatch.setattr(C, "REPO", tmp_path)
    return run_all, docs


def test_run_all_collects_summaries_and_failures(fake_suite):
    run_all, docs = fake_suite
    assert run_all.discover() == ["alpha", "broken", "plain"]
    out = docs / "benchmarks.md"
    assert run_all.main(["--quick", "--out", str(out)]) == 1  # one benchmark failed
    text = out.read_text()
    assert "ratio 12.5x quick=True" in text  # the summary block, --quick passed through
    assert "noise" not in text
    assert "failed (exit 1)" in text and "could not find the data" in text
    assert "plain result 3.0x" in text  # no --quick option: rerun at full size, tail of output kept
    assert "`python benchmarks/plain.py`" in text
    assert "[docs/alpha.md](alpha.md)" in text
    for name in ("eval_scale", "ga_overhead", "input_pipeline", "serving", "train_throughput", "composeae_bert"):
        assert f"| {name} | `python benchmarks/{name}.py` | not present in this checkout" in text
    assert "| logical_cpus |" in text


def test_run_all_only_and_unknown(fake_suite, capsys):
    run_all, docs = fake_suite
    assert run_all.main(["--only", "alpha", "--out", str(docs / "b.md")]) == 0
    assert "quick=False" in (docs / "b.md").read_text()
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])
    assert "no benchmarks/nope.py" in capsys.readouterr().err


def test_run_all_quick_for_one_benchmark(fake_suite):
    run_all, docs = fake_suite
    out = docs / "q.md"
    assert run_all.main(["--only", "alpha,plain", "--quick-for", "alpha", "--out", str(out)]) == 0
    text = out.read_text()
    assert "ratio 12.5x quick=True" in text and "`python benchmarks/alpha.py --quick`" in text
    assert "`python benchmarks/plain.py`" in text and "`python benchmarks/plain.py --quick`" not in text
    assert "Run with `--quick` (smaller workloads, to fit the time available): alpha;" in text
    assert "| load before / after |" in text
    assert "not run" not in text
    with pytest.raises(SystemExit):
        run_all.main(["--quick-for", "nope"])


def test_run_all_report_after_each_benchmark(fake_suite, monkeypatch):
    """Stopped after its first benchmark, the suite leaves a report naming the ones not reached."""
    run_all, docs = fake_suite
    out = docs / "partial.md"
    real = run_all.run_one
    calls = []

    def run_then_stop(name, *a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(run_all, "run_one", run_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_all.main(["--only", "alpha,plain", "--out", str(out)])
    text = out.read_text()
    assert "ratio 12.5x quick=False" in text
    assert "| plain | `python benchmarks/plain.py` | not run (the suite had not reached it) |" in text


def test_run_all_extra_options_reach_the_benchmark_and_the_report(fake_suite):
    run_all, docs = fake_suite
    out = docs / "e.md"
    assert run_all.main(["--only", "alpha", "--args", "alpha=--steps 200 --label 'a b'", "--out", str(out)]) == 0
    text = out.read_text()
    assert "args --steps 200 --label a b" in text  # what the script received
    assert "`python benchmarks/alpha.py --steps 200 --label 'a b'`" in text  # the command, quoted
    assert "Run with options other than the defaults (see the command column): alpha." in text
    with pytest.raises(SystemExit):
        run_all.main(["--args", "nope=--x"])


def test_real_benchmarks_follow_the_suite_conventions():
    """Every benchmark in the repository accepts --quick, prints a summary block and writes
    docs/<name>.md by default (read from the source: running them is the suite's job)."""
    import run_all

    names = run_all.discover(BENCH)
    assert set(run_all.KNOWN) <= set(names)
    for name in names:
        src = (BENCH / f"{name}.py").read_text()
        assert '"--quick"' in src, name
        assert "print_summary(" in src, name
        assert "write_doc(" in src, name
