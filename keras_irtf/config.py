"""Typed experiment configuration: dataclass defaults <- YAML files <- command-line overrides.

A config is a tree of dataclasses. YAML files and `--set section.key=value` overrides are merged
into it in that order; an unknown section or key is an error that lists the valid ones, so a typo
never silently trains the wrong experiment.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Optional

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


@dataclasses.dataclass
class DataConfig:
    dataset: str = "css"
    # Folder of the dataset in its official layout. For CSS, None means: generate the built-in
    # benchmark of size `css_size` into `cache_dir` (once) and read it from there.
    root: Optional[str] = None
    css_size: str = "small"  # smoke | small | full (built-in generator)
    css_seed: int = 0  # generator seed (the dataset itself), independent of the training seed
    css_images: str = "auto"  # auto (PNG if present, else 2D render) | png | 2d
    cache_dir: Optional[str] = None  # default: $KERAS_IRTF_CACHE or ./data/cache
    image_size: int = 64
    train_recall_queries: int = 10000  # size of the seeded training-query sample for Ms
    # Keep only a seeded subset of this many training queries (None = all): a small training set
    # trained for many epochs over-fits, the regime in which a regulariser such as GA can help.
    max_train_queries: Optional[int] = None
    on_bad_image: str = "error"  # error | skip (count and skip unreadable images)
    # CSS training sampler: reference (TIRG: a modification record uniformly, then one of its
    # pairs) | uniform_pairs (uniformly over all pairs). MIT-States/Fashion200k: reference only.
    sampler: str = "reference"
    # CSS: also evaluate on the test split rendered under a shift training never sees
    # (None | render | noise; keras_irtf.data.css_shift): metrics.json gets a test_shift block.
    css_shift: Optional[str] = None
    file_cache: Optional[str] = None  # folder for a tf.data file cache of decoded images


@dataclasses.dataclass
class ModelConfig:
    method: str = "tirg"  # tirg | concat | image_only | text_only | composeae | composeae_real
    image_encoder: str = "small_cnn"  # small_cnn | resnet18
    image_weights: Optional[str] = None  # local keras-hub preset folder for a pretrained ResNet
    text_encoder: str = "lstm"  # lstm | bert_hub | bert_keras_hub (frozen BERT, local files)
    bert_preprocess: Optional[str] = None  # bert_hub: folder of the TF-Hub preprocessing SavedModel
    bert_encoder: Optional[str] = None  # bert_hub: folder of the TF-Hub BERT encoder SavedModel
    bert_preset: Optional[str] = None  # bert_keras_hub: local keras-hub preset folder
    bert_dim: int = 768  # width of BERT's pooled output (768 for BERT-Base)
    bert_seq_length: int = 0  # tokens per text; 0 = the preprocessing model's default
    text_cache: bool = True  # embed each distinct text once per run (frozen BERT)
    # ComposeAE's extra terms: image reconstruction, text reconstruction, rotational symmetry
    composeae_loss_weights: tuple = (0.1, 0.1, 0.01)
    composeae_dropout: float = 0.5  # dropout of ComposeAE's projections (the reference's 0.5)
    embed_dim: int = 512
    word_embed_dim: int = 512
    text_hidden_dim: int = 512
    cnn_filters: tuple = (16, 32, 64, 128)
    cnn_stem_stride: int = 2
    max_text_length: int = 16
    dropout: float = 0.1
    initial_scale: float = 4.0


@dataclasses.dataclass
class LossConfig:
    kind: str = "batch_classification"  # batch_classification | soft_triplet
    eta: float = 0.0  # weight of the similarity matching loss L_S (0 = off)
    similarity_reduction: str = "sum"  # sum (paper: ||.||^2) | mean (authors' code: mean over dims)


@dataclasses.dataclass
class GAConfig:
    # Comma-separated list of: adversarial, isotropic, fgsm, l1, l2 ("" = none).
    methods: str = ""
    # Adversarial GA: L_GA^A = eps * mean_i ||dL/dx_i||_q with q the dual of the attack norm p.
    eps: float = 1e-3
    attack_norm: str = "inf"  # inf -> q = 1 ; 2 -> q = 2
    point: str = "input"  # input | image_feature | text_feature | composed
    # Isotropic GA: gamma * n added to the gradient of every trainable variable, n ~ N(0, 1).
    # Default: the authors' scale and gamma. Measured on CSS (issue 14, docs/results/README.md):
    # no gamma helped; per_element at gamma >= 1e-2 hurt, mean at 1e-2 had no effect.
    gamma: float = 1e-2
    noise_scaling: str = "mean"  # mean (gamma * n / size, the authors') | per_element (gamma * n)
    mode: str = "paper"  # paper | reference (the authors' code, departures included)
    # FGSM baseline: delta = fgsm_eps * sign(dL/dx).
    fgsm_eps: float = 1e-2
    # L1 / L2 weight regularisation baselines.
    l1: float = 1e-6
    l2: float = 1e-4


@dataclasses.dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd | adam
    learning_rate: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-6
    decay_steps: tuple = ()  # steps at which the learning rate is multiplied by decay_factor
    decay_factor: float = 0.1
    backbone_lr_multiplier: float = 0.1  # pretrained image backbone layers
    clipnorm: Optional[float] = None


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 32
    steps: int = 1000
    steps_per_epoch: int = 200
    seed: int = 0
    pairs_per_source: bool = True  # TIRG sampler: consecutive queries share a source image
    out: Optional[str] = None  # run folder; default runs/<dataset>_<method>[_<ga>]_s<seed>
    jit_compile: bool = False
    backup_every_steps: int = 200
    log_every_steps: int = 50  # TensorBoard: loss terms and learning rate every N steps
    strategy: str = "auto"  # auto | one_device | mirrored | multi_worker
    devices: Optional[str] = None


@dataclasses.dataclass
class EvalConfig:
    ks: tuple = (1, 5, 10, 50)
    whm_ks: tuple = (1, 5, 10)  # the recalls averaged into Ms and Mt (Fashion200k: 1, 10, 50)
    alpha: float = 0.5
    batch_size: int = 256
    query_chunk: int = 1024
    gallery_chunk: int = 8192
    backend: str = "tf"  # retrieval: tf | faiss (exact, needs faiss-cpu) | auto (faiss when installed)


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    ga: GAConfig = dataclasses.field(default_factory=GAConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def copy(self) -> "Config":
        return copy.deepcopy(self)

    @property
    def ga_methods(self) -> tuple:
        return parse_ga_methods(self.ga.methods)


GA_METHODS = ("adversarial", "isotropic", "fgsm", "l1", "l2")


def parse_ga_methods(text) -> tuple:
    if isinstance(text, (list, tuple)):
        items = [str(t).strip() for t in text]
    else:
        items = [t.strip() for t in str(text or "").split(",")]
    items = [t for t in items if t and t != "none"]
    unknown = [t for t in items if t not in GA_METHODS]
    if unknown:
        raise ConfigError(
            f"ga.methods: unknown method(s) {unknown}; expected a comma-separated subset of "
            f"{list(GA_METHODS)}"
        )
    return tuple(dict.fromkeys(items))


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(section: str, field: dataclasses.Field, value, where: str):
    """Convert a YAML/CLI value to the field's declared type, or explain what was expected."""
    default = field.default if field.default is not dataclasses.MISSING else None
    typ = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    key = f"{section}.{field.name}"
    if value is None:
        if "Optional" in typ:
            return None
        raise ConfigError(f"{where}: {key} cannot be null (expected {typ})")
    try:
        if isinstance(default, bool) or typ == "bool":
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "yes", "1", "on"):
                    return True
                if low in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, tuple) or typ == "tuple":
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
                value = [yaml.safe_load(v) for v in value]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(value)
        if isinstance(default, float) or "float" in typ:
            return float(value)
        if (isinstance(default, int) and not isinstance(default, bool)) or "int" in typ:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, str) or "str" in typ:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key}={value!r} is not a valid {typ}") from None
    return value


def merge_dict(cfg: Config, updates: dict, where: str = "config") -> Config:
    """Apply a nested dict {section: {key: value}} onto `cfg` (in place) and return it."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(updates).__name__}")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for section, values in updates.items():
        if section not in sections:
            raise ConfigError(
                f"{where}: unknown config section {section!r}; valid sections: {sorted(sections)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys")
        sub = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(sub)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"{where}: unknown config key {section}.{key}; valid keys in {section!r}: "
                    f"{sorted(fields)}"
                )
            setattr(sub, key, _coerce(section, fields[key], value, where))
    return cfg


def parse_override(text: str) -> dict:
    """'train.steps=100' -> {'train': {'steps': 100}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. train.steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return {parts[0]: {parts[1]: value}}


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return data


def repo_configs_dir() -> Path:
    """The `configs/` folder next to the package (a source checkout or editable install)."""
    return Path(__file__).resolve().parent.parent / "configs"


def load_config(paths=(), overrides=(), base: Optional[Config] = None) -> Config:
    """Defaults <- each YAML in `paths` (a file may name `base:` files to include) <- overrides."""
    cfg = base.copy() if base is not None else Config()
    for path in paths:
        _apply_file(cfg, Path(path), seen=set())
    for item in overrides:
        update = parse_override(item) if isinstance(item, str) else item
        merge_dict(cfg, update, where=f"--set {item}" if isinstance(item, str) else "override")
    validate(cfg)
    return cfg


def _apply_file(cfg: Config, path: Path, seen: set):
    if path in seen:
        raise ConfigError(f"config file {path} includes itself")
    seen.add(path)
    data = load_yaml(path)
    bases = data.pop("base", None) or []
    for b in [bases] if isinstance(bases, str) else bases:
        _apply_file(cfg, (path.parent / b).resolve(), seen)
    merge_dict(cfg, data, where=str(path))


_CHOICES = {
    ("data", "css_size"): ("smoke", "small", "full"),
    ("data", "css_images"): ("auto", "png", "2d"),
    ("data", "on_bad_image"): ("error", "skip"),
    ("model", "text_encoder"): ("lstm", "bert_hub", "bert_keras_hub"),
    ("loss", "kind"): ("batch_classification", "soft_triplet"),
    ("loss", "similarity_reduction"): ("sum", "mean"),
    ("ga", "attack_norm"): ("inf", "2"),
    ("ga", "point"): ("input", "image_feature", "text_feature", "composed"),
    ("ga", "noise_scaling"): ("per_element", "mean"),
    ("ga", "mode"): ("paper", "reference"),
    ("optim", "optimizer"): ("sgd", "adam"),
    ("train", "strategy"): ("auto", "one_device", "mirrored", "multi_worker"),
}


def validate(cfg: Config):
    for (section, key), choices in _CHOICES.items():
        value = str(getattr(getattr(cfg, section), key))
        if value not in choices:
            raise ConfigError(f"{section}.{key}={value!r}: expected one of {list(choices)}")
    parse_ga_methods(cfg.ga.methods)
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be >= 2 (the batch supplies the negatives)")
    if cfg.train.steps < 1:
        raise ConfigError("train.steps must be >= 1")


def default_cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or os.environ.get("KERAS_IRTF_CACHE") or "data/cache")


def default_run_name(cfg: Config) -> str:
    ga = "+".join(cfg.ga_methods)
    parts = [cfg.data.dataset, cfg.model.method]
    if cfg.loss.eta > 0:
        parts.append("ls")
    if ga:
        parts.append(ga.replace("+", "-"))
    parts.append(f"s{cfg.train.seed}")
    return "_".join(parts)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
