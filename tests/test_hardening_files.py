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


class _Exploit:
    """Unpickling this object creates a marker file (what a crafted .npy could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_css_npy_with_code_is_refused_and_runs_nothing(tmp_path):
    import numpy as np

    from keras_irtf.data.base import DatasetError
    from keras_irtf.data.css import NPY_NAME, read_css_npy

    marker = tmp_path / "pwned"
    root = tmp_path / "css"
    root.mkdir()
    payload = np.empty((), dtype=object)
    payload[()] = {"train": {"objects_img": [], "mods": [_Exploit(marker)]}, "test": {}}
    np.save(root / NPY_NAME, payload, allow_pickle=True)
    with pytest.raises(DatasetError, match=rf"{NPY_NAME}: refused to unpickle (posix|os)\.system"):
        read_css_npy(root)
    assert not marker.exists()


def test_official_style_css_npy_still_loads(css_smoke_root):
    import numpy as np

    from keras_irtf.data.css import NPY_NAME, read_css_npy
    from keras_irtf.data.safe_files import load_pickled_npy

    data = read_css_npy(css_smoke_root)
    reference = np.load(css_smoke_root / NPY_NAME, allow_pickle=True).item()
    assert data["train"]["mods"][:5] == reference["train"]["mods"][:5]
    assert len(data["test"]["objects_img"]) == len(reference["test"]["objects_img"])
    # numpy arrays and scalars inside the dict (the published file holds some) are admitted
    tricky = {"pos": np.array([0.25, 0.5]), "id": np.int64(3), "labels": np.arange(4), "f": np.float32(1.5)}
    np.save(css_smoke_root.parent / "tricky.npy", tricky, allow_pickle=True)
    back = load_pickled_npy(css_smoke_root.parent / "tricky.npy")
    assert back["id"] == 3 and back["f"] == 1.5
    np.testing.assert_array_equal(back["labels"], np.arange(4))
    np.testing.assert_array_equal(load_pickled_npy_plain(css_smoke_root.parent), np.ones(3))


def load_pickled_npy_plain(folder):
    import numpy as np

    from keras_irtf.data.safe_files import load_pickled_npy

    np.save(folder / "plain.npy", np.ones(3))
    return load_pickled_npy(folder / "plain.npy")


def _fashion_with_line(root, line):
    from keras_irtf.testing.fixtures import write_fashion200k

    write_fashion200k(root)
    label = root / "labels" / "dress_train_detect_all.txt"
    label.write_text(label.read_text() + line)
    return label


@pytest.mark.parametrize("listed", ["ABS", "../outside/secret.jpeg", "women/link/secret.jpeg"])
def test_fashion200k_refuses_paths_outside_the_root(tmp_path, listed):
    from keras_irtf.data.base import DatasetError
    from keras_irtf.data.fashion200k import Fashion200kDataset
    from keras_irtf.testing.fixtures import _jpeg

    import numpy as np

    secret = tmp_path / "outside" / "secret.jpeg"
    _jpeg(secret, np.random.default_rng(0), (10, 20, 30))
    root = tmp_path / "f200k"
    (root / "women").mkdir(parents=True)
    (root / "women" / "link").symlink_to(tmp_path / "outside")  # a symlink out of the root
    listed = str(secret) if listed == "ABS" else listed
    label = _fashion_with_line(root, f"{listed}\t0.9\tblue floral dress\n")
    line = len(label.read_text().splitlines())
    with pytest.raises(DatasetError, match=rf"{label}, line {line}: image path .*outside the dataset root"):
        Fashion200kDataset(root, image_size=32, verbose=False)
    ds = Fashion200kDataset(root, image_size=32, on_bad_image="skip", verbose=False)
    assert all("secret" not in p for p in ds.train.image_paths)
    listed_lines = sum(len(f.read_text().splitlines()) for f in (root / "labels").glob("*_train_*"))
    assert ds.train.num_images == listed_lines - 1


def test_mitstates_refuses_a_symlink_out_of_the_root(tmp_path):
    from keras_irtf.data.base import DatasetError
    from keras_irtf.data.mitstates import MITStatesDataset
    from keras_irtf.testing.fixtures import _jpeg, write_mitstates

    import numpy as np

    secret = tmp_path / "outside" / "secret.jpg"
    _jpeg(secret, np.random.default_rng(0), (10, 20, 30))
    root = write_mitstates(tmp_path / "mit")
    link = root / "images" / "ripe apple" / "image_9999.jpg"
    link.symlink_to(secret)
    with pytest.raises(DatasetError, match=r"image_9999\.jpg.*outside the dataset root"):
        MITStatesDataset(root, image_size=32, verbose=False)
    ds = MITStatesDataset(root, image_size=32, on_bad_image="skip", verbose=False)
    assert not any("image_9999" in p for p in ds.train.image_paths)


def test_contained_path_accepts_plain_relative_paths(tmp_path):
    from keras_irtf.data.safe_files import contained_path

    assert contained_path(tmp_path, "a/b.jpg", "x") == tmp_path / "a" / "b.jpg"
    assert contained_path(tmp_path, "a/../b.jpg", "x") == tmp_path / "a/../b.jpg"  # stays inside
    assert contained_path(tmp_path, "../b.jpg", "x", policy="skip") is None
