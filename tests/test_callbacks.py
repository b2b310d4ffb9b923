"""TrainingScalars: window means of every tracked loss term, and the learning rate, in TensorBoard.

A tiny Keras model with two Mean trackers (like ComposedRetrievalModel's loss terms) keeps this
fast; tests/test_whm_plot.py checks that `train()` logs the real model's terms.
"""

from collections import defaultdict

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_irtf.training.callbacks import TrainingScalars


def read_scalars(log_dir):
    out = defaultdict(dict)
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                out[v.tag][event.step] = float(tf.make_ndarray(v.tensor))
    return out


class TwoTermModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.trackers = {n: keras.metrics.Mean(name=n) for n in ("loss", "aux_term")}

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            err = tf.reduce_mean(tf.square(self(x) - y))
            aux = tf.reduce_mean(x)  # changes every step, independent of the weights
            loss = err + 0.0 * aux
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.trackers["loss"].update_state(loss)
        self.trackers["aux_term"].update_state(aux)
        return {n: t.result() for n, t in self.trackers.items()}

    @property
    def metrics(self):
        return list(self.trackers.values())


class StepValues(keras.callbacks.Callback):
    """Each step's value, recovered from the running epoch means Keras passes in `logs`."""

    def __init__(self, name):
        super().__init__()
        self.name, self.values, self._prev = name, [], 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs[self.name])
        self.values.append((batch + 1) * mean - batch * (self._prev if batch else 0.0))
        self._prev = mean


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tb")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((14 * 8, 3)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5]], "float32")
    model = TwoTermModel()
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([6], [0.02, 0.002])
    model.compile(optimizer=keras.optimizers.SGD(lr))
    recorders = [StepValues("loss"), StepValues("aux_term")]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    history = model.fit(ds, epochs=2, steps_per_epoch=7, verbose=0,
                        callbacks=[TrainingScalars(log_dir, every_n_steps=4)] + recorders)
    return read_scalars(log_dir), {r.name: np.array(r.values) for r in recorders}, history.history


def test_terms_and_learning_rate_are_logged_every_n_steps(logged):
    scalars, _, _ = logged
    for name in ("loss", "aux_term"):
        assert sorted(scalars[f"loss_terms/{name}"]) == [4, 8, 12, 14]  # + the last, shorter window
    lr = scalars["optimizer/learning_rate"]
    # the rate in effect after each step: 0.02 up to step 6, then x 0.1
    assert lr[4] == pytest.approx(0.02) and lr[8] == pytest.approx(0.002) and lr[14] == pytest.approx(0.002)


def test_values_are_window_means_across_epoch_boundaries(logged):
    """Window 5-8 straddles the end of epoch 1 (step 7), where Keras resets its trackers."""
    scalars, steps, history = logged
    assert len(steps["aux_term"]) == 14 and np.ptp(steps["aux_term"]) > 0.1
    for name in ("loss", "aux_term"):
        for start, end in ((0, 4), (4, 8), (8, 12), (12, 14)):
            assert scalars[f"loss_terms/{name}"][end] == pytest.approx(steps[name][start:end].mean(), rel=1e-4, abs=1e-6)
        # Keras' own epoch means are the means of steps 1-7 and 8-14
        assert history[name][0] == pytest.approx(steps[name][:7].mean(), rel=1e-4, abs=1e-6)
        assert history[name][1] == pytest.approx(steps[name][7:].mean(), rel=1e-4, abs=1e-6)


def test_bad_frequency_is_rejected():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        TrainingScalars("/tmp/unused", every_n_steps=0)


def test_a_training_that_raises_leaves_the_summary_state_as_it_was(css_smoke_root, tmp_path):
    """Keras' TensorBoard callback makes its writer the default with a record-every-N condition
    until on_train_end; a training that raises must not leave them behind, or every later summary
    of the process (the next run's window means) is filtered by the dead run's step counter."""
    from tests.conftest import tiny_config
    from keras_irtf.training.loop import train

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise RuntimeError("stopped by the test")

    cfg = tiny_config(css_smoke_root, f"train.out={tmp_path / 'run'}", "train.steps=6", "train.log_every_steps=4")
    with pytest.raises(RuntimeError, match="stopped by the test"):
        train(cfg, verbose=0, callbacks=[Stop()])
    writer = tf.summary.create_file_writer(str(tmp_path / "after"))
    with writer.as_default(step=1):
        tf.summary.scalar("after", 1.0)  # step 1: dropped if the dead run's "step % 4 == 0" still applies
    writer.close()
    assert read_scalars(tmp_path / "after")["after"] == {1: 1.0}
