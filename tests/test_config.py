import subprocess
import sys

import pytest

from keras_irtf.config import Config, ConfigError, default_run_name, load_config, parse_override, repo_configs_dir

REPO = repo_configs_dir().parent


def test_layers_merge_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  steps: 10\n  batch_size: 8\nga:\n  methods: adversarial\n")
    cfg = load_config([a], ["train.steps=20", "ga.adversarial.eps=0.5", "model.image_encoder.filters=[4,8]"])
    assert cfg.train.steps == 20 and cfg.train.batch_size == 8
    assert cfg.ga.adversarial.eps == 0.5 and cfg.ga_methods == ("adversarial",)
    assert cfg.model.image_encoder.filters == (4, 8)
    assert Config().train.steps != 20  # defaults untouched


def test_base_includes(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 7\n  seed: 3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config([tmp_path / "child.yaml"])
    assert (cfg.train.steps, cfg.train.seed) == (9, 3)


def test_unknown_key_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key train\.stepz.*valid keys.*'steps'"):
        load_config([bad])
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'"):
        load_config([], ["trian.steps=3"])


def test_bad_values_are_explained():
    with pytest.raises(ConfigError, match=r"train\.steps='many' is not a valid int"):
        load_config([], ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"ga\.point='pixels': expected one of"):
        load_config([], ["ga.point=pixels"])
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['adverserial'\]"):
        load_config([], ["ga.methods=adverserial,isotropic"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("steps=3")


def test_run_name_reflects_the_experiment():
    cfg = load_config([], ["ga.methods=isotropic,adversarial", "loss.eta=0.001", "train.seed=2"])
    assert default_run_name(cfg) == "css_tirg_ls_isotropic-adversarial_s2"


def test_shipped_configs_load():
    for path in sorted(repo_configs_dir().rglob("*.yaml")):
        load_config([path])


def test_the_recommended_robustness_config_is_the_study_row_it_cites():
    """configs/css_fgsm.yaml quotes the fgsm row of the GA study; its training settings must be
    that row's (the study's validation split and shifted test split aside)."""
    from keras_irtf.training.ablation import load_study

    study_path = repo_configs_dir() / "css_ga_study.yaml"
    _, overrides = load_study(study_path).rows["fgsm"]
    measured = load_config([study_path], overrides)
    shipped = load_config([repo_configs_dir() / "css_fgsm.yaml"])
    for section in ("model", "loss", "optim", "train"):
        assert getattr(shipped, section) == getattr(measured, section), section
    # the study file also sets GA^I's exclude, which a run without GA^I never reads
    assert (shipped.ga.methods, shipped.ga.point, shipped.ga.mode, shipped.ga.fgsm) == (
        measured.ga.methods, measured.ga.point, measured.ga.mode, measured.ga.fgsm)
    assert shipped.data.image_size == measured.data.image_size
    assert shipped.data.dataset.size == measured.data.dataset.size
    assert shipped.ga.methods == "fgsm" and shipped.ga.fgsm.eps == 0.2


def _train_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_cli_unknown_dataset_and_key_are_clear_errors():
    r = _train_cli("--dataset", "imagenet")
    assert r.returncode == 2 and "invalid choice: 'imagenet'" in r.stderr and "'css'" in r.stderr
    r = _train_cli("--dataset", "css", "--set", "optim.lr=0.1")
    assert r.returncode == 2 and "unknown config key optim.lr" in r.stderr and "learning_rate" in r.stderr
