"""benchmarks/gallery_index.py at a tiny size: the gmm set through every index kind, the report's
fields, exact search's recall, and the cache a rerun reads instead of generating."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gallery_index.py"
TINY = ["--size", "2000", "--sets", "gmm", "--skip-beam", "--queries", "60", "--batch", "25",
        "--latency-queries", "50", "--gmm-clusters", "20", "--ef-search", "16,64", "--nprobe", "4,16",
        "--refine", "1,10"]


def run(tmp_path, *extra):
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--cache", str(tmp_path / "cache"),
                           "--tmp", str(tmp_path), "--out-md", str(out), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          # OpenMP threads that wait passively: on a busy machine, spinning ones make faiss's
                          # small k-means runs several times slower
                          env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.with_suffix(".json").read_text()), out.read_text()


def test_tiny_gmm_run_reports_every_kind(tmp_path):
    stdout, results, report = run(tmp_path)
    assert results["size"] == 2000 and results["queries"] == 60 and results["omp_threads"] >= 1
    assert results["omp_wait_policy"] == "PASSIVE"
    assert results["beam"] == {"skipped": "--skip-beam"}
    gmm = results["sets"]["gmm"]
    assert set(results["sets"]) == {"gmm"} and gmm["size"] == 2000 and gmm["dim"] == 512 and not gmm["cached"]
    assert gmm["description"]["clusters"] == 20
    kinds = {k["kind"]: k for k in gmm["kinds"]}
    assert list(kinds) == ["flat", "hnsw", "ivfpq"]
    for kind in kinds.values():
        assert kind["build_seconds"] >= 0 and kind["index_file_bytes"] > 2000 * 64
        assert isinstance(kind["rss_growth_build_mb"], float) and kind["load_before"] >= 0
        for s in kind["settings"]:
            assert 0 < s["p50_ms"] <= s["p99_ms"] and s["batch_qps"] > 0 and s["latency_queries"] == 50
            assert 0 <= s["recall_at_10"] <= 1
            assert s["meets_goal"] == (s["p50_ms"] <= 2 and s["recall_at_10"] >= 0.99)
    (flat,) = kinds["flat"]["settings"]
    assert flat["recall_at_10"] == 1.0 and flat["search_params"] == {}
    assert kinds["flat"]["index_file_bytes"] >= 2000 * 512 * 4  # every vector, uncompressed
    assert [s["search_params"] for s in kinds["hnsw"]["settings"]] == [{"ef_search": 16}, {"ef_search": 64}]
    assert [s["search_params"] for s in kinds["ivfpq"]["settings"]] == [
        {"nprobe": n, "refine": r} for n in (4, 16) for r in (1, 10)]
    assert all("speedup_vs_flat_p50" in s for k in ("hnsw", "ivfpq") for s in kinds[k]["settings"])
    assert "| flat | - | exact |" in report and "=== SUMMARY gallery_index ===" in stdout
    assert "[gallery_index] hnsw ef_search=64: p50" in stdout

    # a rerun reads the vectors from the cache
    _, again, _ = run(tmp_path, "--kinds", "flat")
    assert again["sets"]["gmm"]["cached"] and [k["kind"] for k in again["sets"]["gmm"]["kinds"]] == ["flat"]
    assert again["sets"]["gmm"]["kinds"][0]["settings"][0]["recall_at_10"] == 1.0


def test_unknown_set_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sets", "gmm,nope", "--out-md", str(tmp_path / "r.md")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--sets: unknown set 'nope'" in proc.stderr
