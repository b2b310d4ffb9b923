"""Hardening of files read and written: modes of run-folder files, restricted unpickling of the
CSS .npy, path containment of dataset-listed images (issue #15, items 1, 2, 13)."""

import os
import stat

import pytest


def test_atomic_writes_follow_the_umask(tmp_path):
    from keras_irtf.utils import atomic_write_text, write_json

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        write_json(tmp_path / "metrics.json", {"a": 1})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        for name in ("config.yaml", "metrics.json"):
            mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
            assert mode == stat.S_IMODE(plain.stat().st_mode) == 0o644, (name, oct(mode))
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)
