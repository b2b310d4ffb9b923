"""Run by tests/test_distributed_equivalence.py and tests/test_mixed_precision.py in their own
process (two logical CPU devices must be set up before TensorFlow initialises). Checks, on the
CSS smoke set and MirroredStrategy over 2 logical CPUs, the parts named in CHECK_PARTS
(comma-separated; prints one JSON object with a key per part):

masks       every dropout layer of the models (LSTM text encoder, concat, Combiner and ComposeAE
            composers) called on a 16-row global batch under 2 replicas: how many rows i and
            i + 8 share a mask, and whether the global batch's masks equal those one device
            draws from the same generator state.
clip        one SGD step of the tiny GA model (no batch statistics, tests/ga_tiny.py) with
            `optim.clipnorm` (also global_clipnorm, and clipnorm under a LossScaleOptimizer), on
            one device and on 2 replicas, and the control: Keras 3.15's own clipping, of each
            replica's gradient before the sum.
trajectory  the real model of the config trained on one device; from the states it reaches after
            CHECK_STATES steps (e.g. "0,3,6": weights, batch-norm statistics, random-generator
            states, optimizer slots and step counter), one step on one device, one on 2 replicas
            and one on 2 replicas with the replica bug of the negative control (each replica's
            loss divided by its LOCAL batch: the summed gradient is twice too large). With
            CHECK_REFERENCE=float32 (for the 16-bit policies) also one step of the same model in
            float32 from the same state: the size of the policy's own rounding on this CPU.
batches     the training pipeline (keras_irtf.data.pipeline.training_dataset, what
            keras_irtf.training.loop gives model.fit) through model.fit on 2 replicas: what each
            replica's train_step received at each step, against the batches one device reads.

    python tests/distributed_equivalence_check.py CSS_ROOT METHOD [KEY=VALUE ...]
"""

import json
import os
import sys

from two_cpus import max_diff, mirrored, scope  # first: two logical CPUs before TensorFlow starts

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from conftest import tiny_config  # noqa: E402

ROOT, METHOD = sys.argv[1], sys.argv[2]
OVERRIDES = sys.argv[3:]
PARTS = os.environ.get("CHECK_PARTS", "masks,clip,trajectory,batches").split(",")
STATES = [int(s) for s in os.environ.get("CHECK_STATES", "0,3,6").split(",")]
REFERENCE = os.environ.get("CHECK_REFERENCE", "")
GLOBAL_BATCH = 16
strategy = mirrored()
result = {"replicas": strategy.num_replicas_in_sync}


def l2_diff(a, b):
    """The Euclidean norm of the difference of all the arrays together."""
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64) - y))) for x, y in zip(a, b))))


# ---- masks -------------------------------------------------------------------------------------
def check_masks():
    from keras_irtf.experiment import build_model
    from keras_irtf.layers import CombinerComposer, ComposeAEComposer, ConcatComposer

    keras.utils.set_random_seed(0)
    with strategy.scope():
        parts = {
            "lstm_text_encoder": build_model(tiny_config(ROOT), 20).text_encoder,
            "concat": ConcatComposer(8, dropout=0.1),
            "combiner": CombinerComposer(8, dropout=0.5),
            "composeae": ComposeAEComposer(8, dropout=0.5),
        }
    x = np.ones((GLOBAL_BATCH, 64), np.float32)
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(GLOBAL_BATCH))
    batch = next(iter(ds))
    out = {}
    for part, component in parts.items():
        layers = [la for la in component._flatten_layers(include_self=False)
                  if isinstance(la, keras.layers.Dropout) and la.rate > 0]
        for i, layer in enumerate(layers):
            state = layer.seed_generator.state
            start = state.numpy()
            y = strategy.run(tf.function(lambda b, layer=layer: layer(b, training=True)), args=(batch,))
            mirrored = np.concatenate([t.numpy() for t in strategy.experimental_local_results(y)], 0) != 0
            half = GLOBAL_BATCH // 2
            repeated = int(sum(np.array_equal(mirrored[r], mirrored[r + half]) for r in range(half)))
            state.assign(start)  # the same generator state, one device, the whole global batch
            single = layer(tf.constant(x), training=True).numpy() != 0
            out[f"{part}/{i}"] = {"class": f"{type(layer).__module__}.{type(layer).__name__}", "rate": layer.rate,
                                  "rows_repeating_across_replicas": repeated, "of_rows": half,
                                  "equal_to_one_device": bool(np.array_equal(mirrored, single)),
                                  "kept_fraction": float(mirrored.mean())}
    return out


# ---- clip --------------------------------------------------------------------------------------
def check_clip():
    from ga_tiny import tiny_batch, tiny_model

    data = tiny_batch(GLOBAL_BATCH, dtype="float32", seed=1)
    lr = 0.5

    class PerReplicaClipSGD(keras.optimizers.SGD):
        """Keras 3.15's clipping as it happens under a strategy, on each replica's gradient before
        the all-reduce (clipnorm is not set, so the model sees no clipping to take over)."""

        def __init__(self, *args, clip=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.per_replica_clip = clip

        def _clip_gradients(self, grads):
            return [None if g is None else tf.clip_by_norm(g, self.per_replica_clip) for g in grads]

    def step(s, optimizer, start=None):
        with scope(s):
            model = tiny_model("", dtype="float32", seed=0)
            model.compile(optimizer=optimizer())
        if start is not None:
            for v, value in zip(model.trainable_variables, start):
                v.assign(value)
        begin = [v.numpy() for v in model.trainable_variables]
        model.fit(tf.data.Dataset.from_tensors(data), epochs=1, verbose=0, shuffle=False)
        return begin, [v.numpy() for v in model.trainable_variables]

    def optimizer(key, clip):
        if key == "clipnorm_loss_scaled":  # the inner optimizer clips; train_step scales the loss
            return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(lr, clipnorm=clip), initial_scale=2.0**10)
        return keras.optimizers.SGD(lr, **{key: clip})

    out = {}
    for key in ("clipnorm", "global_clipnorm", "clipnorm_loss_scaled"):
        # small enough that every variable (clipnorm) or the whole gradient (global) is clipped
        clip = 3e-3 if key == "global_clipnorm" else 1e-3
        begin, single = step(None, lambda: optimizer(key, clip))
        _, mirrored = step(strategy, lambda: optimizer(key, clip), start=begin)
        entry = {"moved": max_diff(single, begin), "mirrored_diff": max_diff(single, mirrored)}
        if key == "clipnorm":
            _, control = step(strategy, lambda: PerReplicaClipSGD(lr, clip=clip), start=begin)
            entry["control_diff"] = max_diff(single, control)
            # the one-device update of each variable has norm lr * clip (every gradient is clipped)
            entry["update_norms_over_lr_clip"] = [float(np.linalg.norm(a - b)) / (lr * clip)
                                                  for a, b in zip(single, begin)]
        out[key] = entry
    return out


# ---- the real model: trajectory and batches -------------------------------------------------------
def real_model_setup():
    from keras_irtf.data.css import CSSDataset
    from keras_irtf.data.pipeline import training_dataset
    from keras_irtf.data.text import TextVectorizer

    steps = max(STATES) + 1
    cfg = tiny_config(ROOT, f"model.composer={METHOD}", f"train.batch_size={GLOBAL_BATCH}", f"train.steps={steps}",
                      *OVERRIDES)
    data = CSSDataset(ROOT, verbose=False)
    vectorizer = TextVectorizer.from_texts(data.training_texts(), cfg.model.max_text_length)
    batches = list(training_dataset(data, vectorizer, GLOBAL_BATCH, steps, cfg.train.seed, cfg.data.image_size))
    return cfg, data, vectorizer, batches


def make(cfg, vocab_size, s):
    from keras_irtf.experiment import build_model, make_optimizer

    keras.utils.set_random_seed(0)  # the same initial weights and generator seeds in every model
    with scope(s):
        model = build_model(cfg, vocab_size)
        model.compile(optimizer=make_optimizer(cfg, model))
        model.optimizer.build(model.trainable_variables)
    return model


def _inner(optimizer):
    return getattr(optimizer, "inner_optimizer", optimizer)


def state_of(model):
    """Every variable of the model (weights, batch-norm statistics, random-generator states) and
    of its optimizer (slots, step counter, loss scale); the inner optimizer's apart, for a
    reference model without loss scaling."""
    return ([v.numpy() for v in model.variables], [v.numpy() for v in model.optimizer.variables],
            [v.numpy() for v in _inner(model.optimizer).variables])


def load_state(model, state):
    weights, slots, inner_slots = state
    assert len(model.variables) == len(weights)
    for v, value in zip(model.variables, weights):
        v.assign(value)
    if len(model.optimizer.variables) == len(slots):
        targets, values = model.optimizer.variables, slots
    else:  # a float32 reference (no LossScaleOptimizer) from a mixed_float16 state
        targets, values = _inner(model.optimizer).variables, inner_slots
    assert len(targets) == len(values)
    for v, value in zip(targets, values):
        v.assign(value)


def one_step(model, batch):
    history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0, shuffle=False)
    return {k: float(v[-1]) for k, v in history.history.items()}


def check_trajectory(cfg, vectorizer, batches):
    import keras_irtf.losses as L

    vocab = vectorizer.vocab_size
    single = make(cfg, vocab, None)
    mirrored = make(cfg, vocab, strategy)
    control = make(cfg, vocab, strategy)
    reference = None
    if REFERENCE:
        ref_cfg = tiny_config(ROOT, f"model.composer={METHOD}", f"train.batch_size={GLOBAL_BATCH}",
                              *OVERRIDES, f"train.precision={REFERENCE}")
        reference = make(ref_cfg, vocab, None)
    names = [v.path for v in single.trainable_variables]
    n_trainable = len(names)
    true_global_batch_size = L.global_batch_size

    def bug(local_batch, dtype=tf.float32):  # the negative control's replica bug
        return tf.cast(local_batch, dtype)

    out = []
    for t in range(max(STATES) + 1):
        batch = batches[t]
        if t not in STATES:
            one_step(single, batch)
            continue
        start = state_of(single)
        trainable_start = [v.numpy() for v in single.trainable_variables]
        entry = {"state": t, "optimizer_iterations": int(single.optimizer.iterations.numpy())}
        load_state(mirrored, start)
        entry["mirrored_logs"] = one_step(mirrored, batch)
        load_state(control, start)
        L.global_batch_size = bug
        try:
            entry["control_logs"] = one_step(control, batch)
        finally:
            L.global_batch_size = true_global_batch_size
        if reference is not None:
            load_state(reference, start)
            entry["reference_logs"] = one_step(reference, batch)
        entry["single_logs"] = one_step(single, batch)
        after = [v.numpy() for v in single.trainable_variables]
        m_after = [v.numpy() for v in mirrored.trainable_variables]
        c_after = [v.numpy() for v in control.trainable_variables]
        entry["moved"] = max_diff(after, trainable_start)
        entry["moved_l2"] = l2_diff(after, trainable_start)
        for name, other in (("mirrored", m_after), ("control", c_after)):
            entry[f"{name}_diff"] = max_diff(after, other)
            entry[f"{name}_l2"] = l2_diff(after, other)
        worst = max(range(n_trainable), key=lambda i: float(np.abs(after[i] - m_after[i]).max()))
        entry["mirrored_worst_variable"] = names[worst]
        entry["mirrored_state_diff"] = max_diff([v.numpy() for v in single.weights],
                                                [v.numpy() for v in mirrored.weights])
        if reference is not None:
            ref_after = [v.numpy() for v in reference.trainable_variables]
            for name, other in (("single", after), ("mirrored", m_after), ("control", c_after)):
                entry[f"{name}_to_reference"] = max_diff(other, ref_after)
                entry[f"{name}_to_reference_l2"] = l2_diff(other, ref_after)
        out.append(entry)
    return out


def check_batches(cfg, data, vectorizer):
    from keras_irtf.data.pipeline import training_dataset

    steps = 4
    model = make(cfg, vectorizer.vocab_size, strategy)  # built and compiled as keras_irtf.training.loop does
    seen = []
    own_step = model.train_step

    def record(replica, step, text, image_sums):
        seen.append((int(replica), int(step), text.numpy(), image_sums.numpy()))

    def recording_train_step(batch):
        ctx = tf.distribute.get_replica_context()
        tf.py_function(record, [ctx.replica_id_in_sync_group, model.optimizer.iterations, batch["text"],
                                tf.reduce_sum(batch["source_image"], axis=[1, 2, 3])], [])
        return own_step(batch)

    model.train_step = recording_train_step
    ds = training_dataset(data, vectorizer, GLOBAL_BATCH, steps, cfg.train.seed, cfg.data.image_size)
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    one_device = list(training_dataset(data, vectorizer, GLOBAL_BATCH, steps, cfg.train.seed, cfg.data.image_size))
    half = GLOBAL_BATCH // 2
    matches, checked = [], 0
    for replica, step, text, image_sums in seen:
        want = one_device[step]
        rows = slice(replica * half, (replica + 1) * half)
        want_sums = tf.reduce_sum(want["source_image"], axis=[1, 2, 3]).numpy()[rows]
        checked += 1
        matches.append(bool(np.array_equal(text, want["text"].numpy()[rows])
                            and np.allclose(image_sums, want_sums, rtol=1e-6)))
    return {"steps": steps, "records": checked, "all_match": all(matches) and checked == 2 * steps,
            "steps_seen": sorted({s for _, s, _, _ in seen}), "replicas_seen": sorted({r for r, _, _, _ in seen}),
            "distinct_global_batches": len({one_device[s]["text"].numpy().tobytes() for s in range(steps)})}


if "masks" in PARTS:
    result["masks"] = check_masks()
if "clip" in PARTS:
    result["clip"] = check_clip()
if "trajectory" in PARTS or "batches" in PARTS:
    cfg, data, vectorizer, batches = real_model_setup()
    if "trajectory" in PARTS:
        result["trajectory"] = check_trajectory(cfg, vectorizer, batches)
    if "batches" in PARTS:
        result["batches"] = check_batches(cfg, data, vectorizer)
print(json.dumps(result))
