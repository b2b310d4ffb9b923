"""End to end on the modern benchmarks: tiny random CLIP / SigLIP presets saved with keras-hub's
save_to_preset, the Combiner and TIRG trained with GA on FashionIQ, CIRR and triplets fixtures in
their official layouts, the frozen-feature cache reused across runs, a run folder reloaded and
exported for serving. Nothing is downloaded."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_irtf.config import ConfigError, load_config, repo_configs_dir

pytest.importorskip("keras_hub")

TINY_RUN = ["train.batch_size=4", "train.steps=3", "train.steps_per_epoch=3", "data.train_recall_queries=16",
            "eval.batch_size=8", "optim.learning_rate=1e-3"]
GA = ["ga.methods=adversarial,isotropic", "ga.point=image_feature", "ga.adversarial.eps=0.01"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from keras_irtf.testing.cir_fixtures import write_cirr, write_fashioniq, write_triplets
    from keras_irtf.testing.tiny_clip import make_tiny_clip_preset, make_tiny_siglip_preset

    root = tmp_path_factory.mktemp("cir")
    out = {"root": root, "store": root / "features"}
    out["fashioniq"], out["fashioniq_truth"] = root / "fashioniq", write_fashioniq(root / "fashioniq")
    out["cirr"], out["cirr_truth"] = root / "cirr", write_cirr(root / "cirr", arrangement="clip4cir")
    out["triplets"], out["triplets_truth"] = root / "triplets", write_triplets(root / "triplets")
    out["clip"] = make_tiny_clip_preset(root / "clip_preset")
    out["siglip"] = make_tiny_siglip_preset(root / "siglip_preset")
    return out


def _cfg(work, dataset, config, *overrides, family="clip", run="run"):
    base = [repo_configs_dir() / f"{config}.yaml"] if config else []
    items = [f"data.dataset={dataset}", f"data.root={work[dataset]}", f"model.clip_preset={work[family]}",
             f"data.feature_cache={work['store']}", f"train.out={work['root'] / run}"]
    if family != "clip":
        items += [f"model.image_encoder={family}", f"model.text_encoder={family}"]
    return load_config(base, items + TINY_RUN + list(overrides))


def _train(cfg):
    from keras_irtf.training.loop import train

    return train(cfg, verbose=0, overwrite=True)


def _n_images(work, dataset):
    t = work[f"{dataset}_truth"]
    if dataset == "fashioniq":
        return sum(len({q[k] for q in t["train"][c] for k in ("candidate", "target")}) + len(t["val"][c]["gallery"])
                   for c in t["categories"])
    if dataset == "cirr":
        return len(t["train"]["names"]) + len(t["val"]["names"])
    return None


@pytest.mark.parametrize("dataset,config", [("fashioniq", "fashioniq_combiner_ga"), ("fashioniq", "fashioniq_tirg"),
                                            ("cirr", "cirr_combiner_ga"), ("cirr", "cirr_tirg")])
def test_combiner_and_tirg_train_with_ga_on_cached_clip_features(work, dataset, config):
    extra = GA if config.endswith("tirg") else ["ga.adversarial.eps=0.01"]
    cfg = _cfg(work, dataset, config, *extra, run=f"{dataset}_{config}")
    assert cfg.ga.point == "image_feature" and "adversarial" in cfg.ga_methods
    run, metrics = _train(cfg)
    losses = metrics["final_losses"]
    assert np.isfinite(list(losses.values())).all() and losses["ga_adversarial"] > 0
    fc = metrics["feature_cache"]
    assert fc["images"] == fc["images_encoded"] + fc["images_from_store"] >= _n_images(work, dataset)
    test = metrics["test"]
    if dataset == "fashioniq":
        for c in ("dress", "shirt", "toptee"):
            assert 0 <= test[f"{c}_R@10"] <= 1
        assert test["R@10"] == pytest.approx(np.mean([test[f"{c}_R@10"] for c in ("dress", "shirt", "toptee")]))
        # every category's gallery has 6 images: R@10 (and R@50) must be 1
        assert test["R@10"] == 1.0
    else:
        assert {"R@1", "R@5", "R_subset@1", "R_subset@3"} <= set(test)
        assert test["R_subset@3"] >= test["R_subset@1"]
    assert (run / "model.keras").is_file()


def test_the_feature_store_is_reused_by_a_later_run(work):
    cfg = _cfg(work, "triplets", "fashioniq_combiner", run="triplets_first")
    _, first = _train(cfg)
    cfg2 = _cfg(work, "triplets", "fashioniq_combiner", "train.seed=1", run="triplets_second")
    _, second = _train(cfg2)
    assert first["feature_cache"]["images"] == second["feature_cache"]["images"] > 0
    assert second["feature_cache"]["images_encoded"] == 0
    assert second["feature_cache"]["images_from_store"] == second["feature_cache"]["images"]
    assert second["text_cache_from_store"] == second["text_cache_size"]


@pytest.mark.parametrize("point", ["text_feature", "composed"])
def test_ga_at_the_other_points_on_cached_features(work, point):
    """GA^A's penalty at the text feature and at the composed feature, with GA^I and L_S."""
    from keras_irtf.experiment import Experiment

    cfg = _cfg(work, "triplets", "fashioniq_combiner", "ga.methods=adversarial,isotropic", f"ga.point={point}",
               "loss.eta=0.001")
    exp = Experiment(cfg, verbose=False)
    model = exp.create_model()
    history = model.fit(exp.train_dataset(steps=2), epochs=1, steps_per_epoch=2, verbose=0).history
    assert history["ga_adversarial"][-1] > 0 and history["similarity_loss"][-1] > 0
    assert np.isfinite(history["loss"]).all()


def test_pixel_ga_on_a_frozen_uncached_clip_tower(work):
    """cache: false runs the frozen tower on pixels in every step: GA^A at the input pixels works
    (the gradient reaches the pixels through the frozen tower), and no tower variable trains."""
    from keras_irtf.experiment import Experiment

    cfg = _cfg(work, "triplets", "fashioniq_combiner", "ga.methods=adversarial", "ga.point=input",
               "model.image_encoder.cache=false", "ga.adversarial.eps=0.1")
    exp = Experiment(cfg, verbose=False)
    model = exp.create_model()
    assert exp.image_input is None and not model.image_encoder.trainable_variables
    tower = [w.numpy().copy() for w in model.image_encoder.weights]
    history = model.fit(exp.train_dataset(steps=2), epochs=1, steps_per_epoch=2, verbose=0).history
    assert history["ga_adversarial"][-1] > 0
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(tower, model.image_encoder.weights))


def test_pixel_ga_on_cached_clip_features_is_refused(work):
    from keras_irtf.experiment import Experiment

    cfg = _cfg(work, "triplets", "fashioniq_combiner", "ga.methods=adversarial", "ga.point=input")
    with pytest.raises(ConfigError, match="ga.point=image_feature"):
        Experiment(cfg, verbose=False).create_model()


def test_siglip_combiner_on_triplets(work):
    _, metrics = _train(_cfg(work, "triplets", "fashioniq_combiner_ga", family="siglip", run="siglip"))
    assert np.isfinite(list(metrics["final_losses"].values())).all()
    assert 0 <= metrics["test"]["R@1"] <= metrics["test"]["R@5"] <= 1


def test_finetuning_the_text_tower_with_the_sum_composer(work):
    """CLIP4Cir's first stage: the sum of the features, the text tower trained, the image tower
    frozen (and still cached)."""
    from keras_irtf.experiment import Experiment

    cfg = _cfg(work, "triplets", "fashioniq_combiner", "model.composer=sum", "model.finetune=text",
               "optim.learning_rate=1e-2", "optim.finetune_lr_multiplier=1.0")
    exp = Experiment(cfg, verbose=False)
    model = exp.create_model()
    assert exp.image_input is not None and model.text_encoder.cache is None  # text runs in every step
    assert not model.image_encoder.trainable_variables and model.text_encoder.trainable_variables
    text_before = [v.numpy().copy() for v in model.text_encoder.trainable_variables]
    image_before = [w.numpy().copy() for w in model.image_encoder.weights]
    model.fit(exp.train_dataset(steps=2), epochs=1, steps_per_epoch=2, verbose=0)
    assert any(not np.allclose(a, v.numpy()) for a, v in zip(text_before, model.text_encoder.trainable_variables))
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(image_before, model.image_encoder.weights))


def test_a_clip_run_reloads_and_exports_for_serving(work, tmp_path):
    from keras_irtf.experiment import Experiment, evaluate_run
    from keras_irtf.serving.export import export_run, read_export_info

    run, metrics = _train(_cfg(work, "triplets", "fashioniq_combiner_ga", run="export_me"))
    # the run folder is self-contained: the preset folder is not needed to evaluate or export it
    preset = Path(work["clip"])
    moved = preset.with_name(preset.name + "_away")
    preset.rename(moved)
    try:
        # the .keras round trip: the reloaded model scores exactly as the trained one
        again = evaluate_run(run, out=tmp_path / "again.json", verbose=False)
        exp, model = Experiment.from_run(run, verbose=False, load_data=False)
        gallery = work["triplets"] / "images" / "test"
        path = export_run(run, out_root=tmp_path / "exported", gallery=gallery, verbose=False)
    finally:
        moved.rename(preset)
    assert again["test"] == metrics["test"]
    assert exp.preprocessor.describe() == model.image_encoder.own_preprocessor().describe()
    info = read_export_info(path)
    assert info["image_encoder"] == "clip" and info["embedding_dim"] == model.image_encoder.output_dim
    served = tf.saved_model.load(str(path))
    names = sorted(p.name for p in gallery.iterdir())
    image_bytes = [(gallery / n).read_bytes() for n in names[:3]]
    texts = ["make it red", "add a stripe", "darker"]
    out = served.signatures["serving_default"](image_bytes=tf.constant(image_bytes), text=tf.constant(texts))
    prep = exp.preprocessor

    def pixels_of(files):  # decoded as the serving graph decodes them (TensorFlow's JPEG decoder)
        return tf.stack([prep(tf.io.decode_image((gallery / n).read_bytes(), channels=3)) for n in files])

    pixels = pixels_of(names[:3])
    expected = model.embed_queries(pixels, tf.constant(texts))
    np.testing.assert_allclose(out["embedding"].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    r = served.signatures["retrieve"](image_bytes=tf.constant(image_bytes), text=tf.constant(texts),
                                      k=tf.constant([2] * 3, tf.int32))
    gallery_emb = model.embed_images(pixels_of(names))
    best = np.argsort(-(expected.numpy() @ gallery_emb.numpy().T), axis=1)[:, 0]
    assert [Path(p.decode()).name for p in r["paths"].numpy()[:, 0]] == [names[i] for i in best]


def test_a_bare_clip_preset_name_stops_before_any_work(work):
    """--clip-preset NAME (model.clip_preset) is refused by the start-up check, naming that key."""
    from keras_irtf.experiment import Experiment

    cfg = load_config([repo_configs_dir() / "triplets.yaml"],
                      [f"data.root={work['triplets']}", "model.clip_preset=clip_vit_base_patch16"])
    with pytest.raises(ConfigError, match=r"model.clip_preset='clip_vit_base_patch16' is a bare preset name.*"
                                          r"save_to_preset"):
        Experiment(cfg, verbose=False).check()
    cfg = load_config([repo_configs_dir() / "triplets.yaml"], [f"data.root={work['triplets']}"])
    with pytest.raises(ConfigError, match=r"model.image_encoder.preset is not set.*--clip-preset"):
        Experiment(cfg, verbose=False).check()
