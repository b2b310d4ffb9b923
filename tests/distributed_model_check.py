"""Run by tests/test_distributed_ga.py in its own process (logical CPU devices must be set up before
TensorFlow initialises): trains the real model of a config (TIRG or ComposeAE on the CSS smoke
set, GA^A + GA^I + L_S on, dropout off so that the check is about GA and batch norm; the dropout
masks under 2 replicas are one device's, which tests/test_distributed_equivalence.py checks) for
CHECK_STEPS steps on one device, with MirroredStrategy over 2 logical CPUs, and with
MirroredStrategy and a deliberate replica bug (the negative control), from the same weights on
the same global batches, and prints a JSON summary.

    python tests/distributed_model_check.py CSS_ROOT METHOD [KEY=VALUE ...]
"""

import json
import os
import sys

from two_cpus import max_diff, mirrored, scope  # first: two logical CPUs before TensorFlow starts

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from conftest import tiny_config  # noqa: E402

from keras_irtf.data.css import CSSDataset  # noqa: E402
from keras_irtf.data.pipeline import training_dataset  # noqa: E402
from keras_irtf.data.text import TextVectorizer  # noqa: E402
from keras_irtf.experiment import build_model, make_optimizer  # noqa: E402

ROOT, METHOD = sys.argv[1], sys.argv[2]
STEPS = int(os.environ.get("CHECK_STEPS", "2"))
cfg = tiny_config(ROOT, f"model.composer={METHOD}", "ga.methods=adversarial,isotropic", "loss.eta=0.001",
                  "ga.adversarial.eps=0.01", "ga.isotropic.gamma=0.01", "ga.isotropic.noise_scaling=per_element",
                  "model.text_encoder.dropout=0.0", "model.composer.composeae.dropout=0.0", f"train.steps={STEPS}",
                  *sys.argv[3:])
data = CSSDataset(ROOT, verbose=False)
vectorizer = TextVectorizer.from_texts(data.training_texts(), cfg.model.max_text_length)
# the same global batches for both runs, held in memory
batches = list(training_dataset(data, vectorizer, cfg.train.batch_size, STEPS, cfg.train.seed, cfg.data.image_size))
stacked = {k: tf.concat([b[k] for b in batches], 0) for k in batches[0]}


WEIGHTS = []


def train(strategy, start=None):
    keras.utils.set_random_seed(0)  # the same noise stream (the GA generator's seed) in both runs
    with scope(strategy):
        model = build_model(cfg, vectorizer.vocab_size)
        model.compile(optimizer=make_optimizer(cfg, model))
    if start is not None:
        for v, value in zip(model.weights, start):
            v.assign(value)
    begin = [v.numpy() for v in model.weights]
    WEIGHTS[:] = model.weights
    begin_trainable = [v.numpy() for v in model.trainable_variables]
    ds = tf.data.Dataset.from_tensor_slices(stacked).batch(cfg.train.batch_size)
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    logs = {k: float(v[-1]) for k, v in history.history.items()}
    end = [v.numpy() for v in model.trainable_variables]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(end, begin_trainable))
    return begin, end, [v.numpy() for v in model.weights], logs, moved


single_begin, single_end, single_all, single_logs, moved = train(None)
strategy = mirrored()
_, mirrored_end, mirrored_all, mirrored_logs, _ = train(strategy, start=single_begin)

# negative control: the classic replica bug (each replica's loss averaged over its LOCAL batch, so
# the summed gradients are twice too large) must show as a much larger difference
import keras_irtf.losses as L  # noqa: E402

L.global_batch_size = lambda local_batch, dtype=tf.float32: tf.cast(local_batch, dtype)
_, buggy_end, _, buggy_logs, _ = train(strategy, start=single_begin)


print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "moved": moved,
    "max_weight_diff": max_diff(single_end, mirrored_end),
    "buggy_weight_diff": max_diff(single_end, buggy_end),
    "max_state_diff": max_diff(single_all, mirrored_all),
    "worst": sorted(((max_diff([a], [b]), v.path) for a, b, v in zip(single_all, mirrored_all, WEIGHTS)), reverse=True)[:3],
    "buggy_logs": buggy_logs,
    "single_logs": single_logs,
    "mirrored_logs": mirrored_logs,
}))
