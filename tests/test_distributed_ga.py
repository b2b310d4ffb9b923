"""2 replicas (MirroredStrategy on 2 logical CPUs) == one device, with GA^A, GA^I and L_S on.

Runs tests/distributed_ga_check.py in a separate process: logical devices must be configured
before TensorFlow initialises, which this pytest process has already done.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "distributed_ga_check.py"


def _run(methods):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    out = subprocess.run([sys.executable, str(SCRIPT), methods], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_replicas_match_one_device_with_ga_and_ls():
    r = _run("adversarial,isotropic")
    assert r["replicas"] == 2
    assert r["moved"] > 1e-2  # the three steps changed the weights
    for key in ("ga_adversarial", "ga_isotropic", "similarity_loss"):
        assert key in r["single_logs"] and key in r["mirrored_logs"]
    assert r["single_logs"]["ga_adversarial"] > 0
    # same weights after training; a penalty or noise counted twice moves them by ~1e-2
    assert r["max_weight_diff"] < 2e-5, r
    for key in ("loss", "retrieval_loss", "ga_adversarial", "similarity_loss"):
        assert abs(r["single_logs"][key] - r["mirrored_logs"][key]) < 1e-4 * max(1.0, abs(r["single_logs"][key])), key
