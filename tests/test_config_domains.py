"""Numeric config keys are checked against their domain at config time (issue #15 item 10)."""

import pytest

from keras_irtf.config import ConfigError, load_config


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=.nan", r"optim\.learning_rate=nan: expected a finite number > 0"),
    ("optim.learning_rate=.inf", r"optim\.learning_rate=inf: expected a finite number > 0"),
    ("optim.learning_rate=0", r"optim\.learning_rate=0\.0: expected a finite number > 0"),
    ("optim.learning_rate=-0.1", r"optim\.learning_rate=-0\.1: expected a finite number > 0"),
    ("ga.isotropic.gamma=-1e-3", r"ga\.isotropic\.gamma=-0\.001: expected a finite number >= 0"),
    ("ga.adversarial.eps=.nan", r"ga\.adversarial\.eps=nan"),
    ("optim.momentum=1.0", r"optim\.momentum=1\.0: expected a finite number >= 0 and < 1"),
    ("model.text_encoder.dropout=1.5", r"model\.text_encoder\.dropout=1\.5"),
    ("train.steps_per_epoch=0", r"train\.steps_per_epoch=0: expected a finite number >= 1"),
    ("train.seed=-1", r"train\.seed=-1"),
    ("eval.ks=[1,0]", r"eval\.ks\[1\]=0"),
    ("optim.clipnorm=0", r"optim\.clipnorm=0\.0"),
    ("data.image_size=0", r"data\.image_size=0"),
    ("data.image_size=8", r"data\.image_size=8 is below what model\.image_encoder='small_cnn' accepts \(>= 15"),
])
def test_out_of_domain_numbers_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_domain_edges_are_accepted():
    cfg = load_config([], ["ga.isotropic.gamma=0", "optim.momentum=0", "data.image_size=15", "optim.clipnorm=null",
                           "train.backup_every_steps=0"])
    assert cfg.data.image_size == 15
    with pytest.raises(ConfigError, match=r"data\.image_size=14"):
        load_config([], ["data.image_size=14"])
    assert load_config([], ["model.image_encoder=resnet18", "data.image_size=32"]).data.image_size == 32
    with pytest.raises(ConfigError, match=r"resnet18.*>= 32"):
        load_config([], ["model.image_encoder=resnet18", "data.image_size=31"])


def test_every_shipped_config_passes(tmp_path):
    from keras_irtf.config import repo_configs_dir

    for path in sorted(repo_configs_dir().glob("*.yaml")):
        load_config([path])
