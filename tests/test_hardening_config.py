"""Config input that is wrong in kind rather than in value: a boolean where a number is expected,
a YAML file that is not a mapping of sections, sizes no machine can allocate, a plug-in whose
name would replace another module. Each is a one-line ConfigError naming the file and the key,
never a traceback and never a silently different experiment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keras_irtf.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"


# ---- booleans where numbers are expected (and numbers where booleans are) ----------------------
@pytest.mark.parametrize("override, message", [
    ("train.steps=true", r"--set train\.steps=true: train\.steps=True is a boolean; expected an int"),
    ("train.batch_size=yes", r"train\.batch_size=True is a boolean; expected an int"),
    ("optim.learning_rate=true", r"optim\.learning_rate=True is a boolean; expected a float"),
    ("data.image_size=on", r"data\.image_size=True is a boolean; expected an int"),
    ("eval.ks=[1, true]", r"eval\.ks\[1\]=True is a boolean; expected a finite number >= 1"),
    # the settings of a registered kind (OneOf sections), selected or given in the explicit form
    ("data.dataset.seed=true", r"data\.dataset\.seed=True is a boolean; expected an int"),
    ("data.dataset.css.seed=false", r"data\.dataset\.seed=False is a boolean; expected an int"),
    ("model.image_encoder.stem_stride=true", r"model\.image_encoder\.stem_stride=True is a boolean; expected an int"),
    ("model.image_encoder.filters=[16, true]", r"model\.image_encoder\.filters\[1\]=True is a boolean"),
    ("model.text_encoder.lstm.dropout=true", r"model\.text_encoder\.dropout=True is a boolean; expected a float"),
    ("ga.adversarial.eps=true", r"ga\.adversarial\.eps=True is a boolean; expected a float"),
])
def test_booleans_are_refused_for_number_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_booleans_are_refused_for_number_keys_in_a_config_file(tmp_path):
    path = tmp_path / "bools.yaml"
    path.write_text("train:\n  steps: true\n")
    with pytest.raises(ConfigError, match=rf"{path}: train\.steps=True is a boolean; expected an int"):
        load_config([path])
    path.write_text("model:\n  image_encoder:\n    type: small_cnn\n    stem_stride: yes\n")
    with pytest.raises(ConfigError, match=rf"{path}: model\.image_encoder\.stem_stride=True is a boolean"):
        load_config([path])
    path.write_text("data:\n  dataset:\n    css:\n      seed: on\n")
    with pytest.raises(ConfigError, match=rf"{path}: data\.dataset\.seed=True is a boolean"):
        load_config([path])


def test_boolean_keys_take_true_false_and_0_1_only():
    assert load_config([], ["train.jit_compile=1"]).train.jit_compile is True
    assert load_config([], ["train.jit_compile=0"]).train.jit_compile is False
    assert load_config([], ["train.jit_compile=yes"]).train.jit_compile is True
    cfg = load_config([], ["model.image_encoder.clip.cache=0"])
    assert cfg.model.image_encoder._settings["clip"].cache is False
    for value in ("2", "-1", "0.5", "[1]"):
        with pytest.raises(ConfigError, match=r"train\.jit_compile=.*: expected true or false"):
            load_config([], [f"train.jit_compile={value}"])


def test_text_keys_keep_the_text_typed_and_refuse_lists_and_sections(tmp_path):
    # --set: a text key takes the text as typed, not what YAML makes of it
    assert load_config([], ["data.root=yes"]).data.root == "yes"
    assert load_config([], ["train.out=010"]).train.out == "010"
    assert load_config([], ["train.devices=0"]).train.devices == "0"
    assert load_config([], ["data.root=null"]).data.root is None
    with pytest.raises(ConfigError, match=r"train\.devices=\[1, 2\] is a list; expected text"):
        load_config([], ["train.devices=[1, 2]"])
    # a file: an unquoted yes/no is a boolean there; the error says to quote it
    path = tmp_path / "root.yaml"
    path.write_text("data:\n  root: yes\n")
    with pytest.raises(ConfigError, match=rf"{path}: data\.root=True is a boolean; expected text.*quote"):
        load_config([path])
    # ga.methods as a YAML list
    path.write_text("ga:\n  methods: [adversarial, isotropic]\n")
    assert load_config([path]).ga_methods == ("adversarial", "isotropic")


def test_a_key_path_into_a_plain_key_is_explained():
    with pytest.raises(ConfigError, match=r"train\.steps is a single value \(int\), not a section"):
        load_config([], ["train.steps.x=5"])
    with pytest.raises(ConfigError, match=r"data\.dataset\.size is a single value \(str\), not a section"):
        load_config([], ["data.dataset.size.x=5"])


# ---- config files that are not a mapping of sections --------------------------------------------
@pytest.mark.parametrize("text, got", [
    ("- train\n- model\n", "a list"),
    ("5\n", "an int"),
    ("just some words\n", "a str"),
])
def test_a_file_that_is_not_a_mapping_of_sections_is_named(tmp_path, text, got):
    path = tmp_path / "top.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file {path}: expected a mapping of sections .* got {got}"):
        load_config([path])


def test_a_section_that_is_not_a_mapping_is_named_and_an_empty_one_is_empty(tmp_path):
    path = tmp_path / "sec.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=rf"{path}: section 'train' must be a mapping of keys.*got an int"):
        load_config([path])
    path.write_text("train:\n#  steps: 5\nmodel:\n  embed_dim: 32\nga:\n  adversarial:\n#    eps: 0.1\n")
    cfg = load_config([path])  # sections whose keys are all commented out are empty
    defaults = load_config([])
    assert cfg.train.steps == defaults.train.steps and cfg.ga.adversarial.eps == defaults.ga.adversarial.eps


def test_unreadable_config_files_are_named(tmp_path):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match=rf"config file {folder} is a folder"):
        load_config([folder])
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("data:\n  root: /donn\xe9es\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"config file {latin} is not UTF-8 text"):
        load_config([latin])


@pytest.mark.parametrize("base, message", [
    ("5", r"base: expected a file name or a list of file names, got 5"),
    ("[null]", r"base: expected a file name or a list of file names, got \[None\]"),
    ("{a: 1}", r"base: expected a file name or a list of file names"),
])
def test_bad_base_entries_are_named(tmp_path, base, message):
    path = tmp_path / "child.yaml"
    path.write_text(f"base: {base}\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: {message}"):
        load_config([path])


def test_a_shared_base_is_not_a_cycle(tmp_path):
    (tmp_path / "common.yaml").write_text("train:\n  steps: 3\n")
    (tmp_path / "a.yaml").write_text("base: common.yaml\ntrain:\n  seed: 1\n")
    (tmp_path / "b.yaml").write_text("base: common.yaml\ntrain:\n  batch_size: 4\n")
    (tmp_path / "top.yaml").write_text("base: [a.yaml, b.yaml]\n")
    cfg = load_config([tmp_path / "top.yaml"])
    assert (cfg.train.steps, cfg.train.seed, cfg.train.batch_size) == (3, 1, 4)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml includes itself"):
        load_config([tmp_path / "loop.yaml"])


def test_a_key_written_twice_is_refused_and_yaml_errors_are_one_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  steps: 5000\n  batch_size: 32\n  steps: 100\n")
    with pytest.raises(ConfigError, match=rf"config file {path} is not valid YAML: the key 'steps' is written twice "
                                          r"in one mapping \(first on line 2\); keep one \(line 4, column 3\)$"):
        load_config([path])
    # keys merged in with << may be overridden
    path.write_text("train:\n  <<: {steps: 3, seed: 1}\n  steps: 4\n")
    assert (load_config([path]).train.steps, load_config([path]).train.seed) == (4, 1)
    path.write_text("train: [steps: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config([path])
    assert "\n" not in str(e.value) and "line 2, column 1" in str(e.value)


def test_tuple_items_that_are_not_yaml_are_refused():
    with pytest.raises(ConfigError, match=r"eval\.ks"):
        load_config([], ['eval.ks="1,{"'])


# ---- sizes no machine allocates ------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["data.image_size=100000"], r"data\.image_size=100000: expected a finite number >= 1 and <= 4096 \("),
    (["model.embed_dim=1000000"], r"model\.embed_dim=1000000: expected a finite number >= 1 and <= 16384 \("),
    (["model.max_text_length=1000000"], r"model\.max_text_length=1000000: expected .* <= 4096 \("),
    (["train.batch_size=1000000"], r"train\.batch_size=1000000: expected .* <= 65536 \("),
    (["eval.batch_size=1000000"], r"eval\.batch_size=1000000: expected .* <= 65536 \("),
    (["eval.ks=[1, 100000000]"], r"eval\.ks\[1\]=100000000: expected .* <= 10000 \("),
    (["train.seed=4294967296"], r"train\.seed=4294967296: expected .* <= 4294967295 \("),
    (["train.batch_size=4096", "data.image_size=4096"],
     r"train\.batch_size=4096 images of data\.image_size=4096.*768\.0 GiB.*at most 64 GiB"),
    (["eval.query_chunk=1000000", "eval.gallery_chunk=1000000"],
     r"eval\.query_chunk=1000000 x eval\.gallery_chunk=1000000.*at most"),
])
def test_sizes_that_cannot_be_allocated_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)


def test_large_but_real_sizes_are_accepted():
    cfg = load_config([], ["data.image_size=4096", "train.batch_size=32", "model.embed_dim=4096",
                           "model.max_text_length=512", "eval.ks=[1, 10, 1000]", "train.seed=4294967295"])
    assert cfg.data.image_size == 4096
    load_config([], ["model.image_encoder=resnet18", "data.image_size=1024", "train.batch_size=1024"])


# ---- plug-ins named like another module ----------------------------------------------------------
PLUGIN_MODULES = ("gated_sum_composer", "my_plugin_xyz", "installed_pkg_xyz", "broken_plugin_xyz",
                  "my_local_plugin_xyz")


@pytest.fixture(autouse=True)
def _restore_registries():
    """Plug-ins loaded here leave no registration or module behind (other tests list the built-ins)."""
    from keras_irtf.registry import REGISTRIES, load_builtins

    load_builtins()
    saved = {kind: dict(reg._entries) for kind, reg in REGISTRIES.items()}
    yield
    for kind, reg in REGISTRIES.items():
        reg._entries.clear()
        reg._entries.update(saved[kind])
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


def _plugin(folder, name, text="X = 1\n"):
    path = Path(folder) / f"{name}.py"
    path.write_text(text)
    return path


def test_a_plugin_file_named_like_a_standard_library_module_is_refused(tmp_path):
    from keras_irtf.registry import import_modules

    before = sys.modules["json"]
    with pytest.raises(ConfigError, match=r"--import .*json\.py: 'json' is the name of a standard-library module"
                                          r".*rename the file"):
        import_modules([_plugin(tmp_path, "json", "raise SystemExit('plug-in ran')\n")])
    assert sys.modules["json"] is before
    with pytest.raises(ConfigError, match=r"'wave' is the name of a standard-library module"):
        import_modules([_plugin(tmp_path, "wave")])
    assert "wave" not in sys.modules or getattr(sys.modules["wave"], "X", None) is None


def test_a_plugin_module_named_like_a_standard_library_module_is_refused(tmp_path, monkeypatch):
    from keras_irtf.registry import import_modules

    _plugin(tmp_path, "json", "raise SystemExit('plug-in ran')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"--import json: 'json' is the name of a standard-library module.*rename"):
        import_modules(["json"])


def test_a_plugin_named_like_an_imported_or_installed_module_is_refused(tmp_path, monkeypatch):
    from keras_irtf.registry import import_modules

    assert "yaml" in sys.modules
    before = sys.modules["yaml"]
    with pytest.raises(ConfigError, match=r"'yaml' is already the name of .*rename"):
        import_modules([_plugin(tmp_path, "yaml")])
    assert sys.modules["yaml"] is before
    # an installed package that is not imported yet
    site = tmp_path / "site"
    (site / "installed_pkg_xyz").mkdir(parents=True)
    (site / "installed_pkg_xyz" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(ConfigError, match=r"'installed_pkg_xyz' is already the name of .*installed_pkg_xyz.*rename"):
        import_modules([_plugin(mine, "installed_pkg_xyz")])
    assert "installed_pkg_xyz" not in sys.modules
    # a dotted name already imported from elsewhere: the user's file would never be read
    _plugin(mine, "numpy")
    monkeypatch.syspath_prepend(str(mine))
    with pytest.raises(ConfigError, match=r"--import numpy: 'numpy' is already the name of .*rename"):
        import_modules(["numpy"])


def test_legitimate_plugins_still_load(tmp_path, monkeypatch):
    from keras_irtf.registry import COMPOSERS, import_modules

    for _ in range(2):  # the same file again is the same plug-in
        (module,) = import_modules([PLUGINS / "gated_sum_composer.py"])
        assert "gated_sum" in COMPOSERS and module.__name__ == "gated_sum_composer"
    # by module name from PYTHONPATH (or the folder the user runs in), also twice
    _plugin(tmp_path, "my_plugin_xyz", "VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert import_modules(["my_plugin_xyz"])[0].VALUE == 42
    # a file found on sys.path by its own name is not a clash with itself
    assert import_modules([tmp_path / "my_plugin_xyz.py"])[0].VALUE == 42


def test_a_module_in_the_current_folder_is_found_by_name_and_by_path(tmp_path, monkeypatch):
    from keras_irtf.registry import import_modules

    _plugin(tmp_path, "my_local_plugin_xyz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the working folder is appended: undo it after
    assert import_modules(["my_local_plugin_xyz"])[0].X == 1
    assert import_modules(["./my_local_plugin_xyz.py"])[0].X == 1


def test_a_plugin_with_a_syntax_error_is_named_and_not_left_half_imported(tmp_path):
    from keras_irtf.registry import RegistryError, import_modules

    path = _plugin(tmp_path, "broken_plugin_xyz", "def f(:\n")
    with pytest.raises(RegistryError, match=rf"--import {path}: .*line 1"):
        import_modules([path])
    assert "broken_plugin_xyz" not in sys.modules


def test_the_train_tool_refuses_a_plugin_named_json(tmp_path):
    _plugin(tmp_path, "json", "raise SystemExit('plug-in ran')\n")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--import", "./json.py", "--dataset", "css"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --import ./json.py: 'json' is the name of a standard-library module")
    assert "Traceback" not in r.stderr and "plug-in ran" not in r.stderr
    json.dumps({})  # this process's json untouched


def test_a_dataset_that_cannot_fit_in_memory_is_refused_before_decoding(css_smoke_root):
    """An image size the config accepts can still be too large for the whole split on this
    machine: the loader says so (key, bytes, memory) instead of a MemoryError or an OOM kill."""
    from keras_irtf.data.base import DatasetError
    from keras_irtf.data.css import CSSDataset
    from keras_irtf.data.images import check_fits_in_memory

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    side = int((total / 3) ** 0.5) + 1  # one image alone is larger than the machine
    with pytest.raises(DatasetError, match=rf"1 images at data.image_size={side} take .* GiB in memory"):
        check_fits_in_memory(1, side, "test")
    check_fits_in_memory(1000, 64, "test")  # 12 MB: fine
    big = int((0.9 * total / 3 / 48) ** 0.5)  # 48 images at that size would take 90% of memory
    with pytest.raises(DatasetError, match=r"CSS train split: \d+ images at data.image_size="):
        CSSDataset(css_smoke_root, image_size=big, verbose=False)
