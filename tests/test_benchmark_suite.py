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
    for name in ("eval_scale", "ga_overhead", "input_pipeline", "serving", "train_throughput"):
        assert f"| {name} | `python benchmarks/{name}.py` | not present in this checkout" in text
    assert "| logical_cpus |" in text


def test_run_all_only_and_unknown(fake_suite, capsys):
    run_all, docs = fake_suite
    assert run_all.main(["--only", "alpha", "--out", str(docs / "b.md")]) == 0
    assert "quick=False" in (docs / "b.md").read_text()
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])
    assert "no benchmarks/nope.py" in capsys.readouterr().err
