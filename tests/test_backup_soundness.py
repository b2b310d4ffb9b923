"""A backup never holds diverged state, and the divergence message says which backup a re-run
resumes (issue #15 item 7)."""

import json
import math

import numpy as np
import pytest


def _tiny_model():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
    return model


def _step(model, step):
    model.optimizer.iterations.assign(step)


def test_exploded_or_non_finite_state_is_never_backed_up(tmp_path):
    from keras_irtf.training.backup import TrainingBackup, latest_backup

    model = _tiny_model()
    backup = TrainingBackup(tmp_path / "backup", every_steps=5)
    backup.set_model(model)
    _step(model, 5)
    backup.on_train_batch_end(0, {"loss": 0.5})
    assert latest_backup(tmp_path / "backup")["step"] == 5 and backup.last_good_step == 5

    bn = model.layers[1]
    bn.moving_variance.assign(np.full(3, 1e23, np.float32))  # the state seen before a NaN stop
    _step(model, 10)
    backup.on_train_batch_end(0, {"loss": 0.7})  # the loss is still finite
    state = latest_backup(tmp_path / "backup")
    assert state["step"] == 5 and backup.last_good_step == 5
    assert "moving_variance has exploded" in backup.refused[0][1]
    assert len(list((tmp_path / "backup").glob("step-*.weights.h5"))) == 1  # the good one is kept

    bn.moving_variance.assign(np.ones(3, np.float32))
    model.layers[0].kernel.assign(np.full((4, 3), np.nan, np.float32))
    _step(model, 15)
    backup.on_train_batch_end(0, {"loss": 0.7})
    assert latest_backup(tmp_path / "backup")["step"] == 5
    assert "non-finite" in backup.refused[-1][1]

    model.layers[0].kernel.assign(np.zeros((4, 3), np.float32))
    _step(model, 20)
    backup.on_train_batch_end(0, {"loss": math.nan})  # a NaN loss with finite weights: not saved either
    assert latest_backup(tmp_path / "backup")["step"] == 5
    _step(model, 25)
    backup.on_train_batch_end(0, {"loss": 0.3})
    assert latest_backup(tmp_path / "backup")["step"] == 25


def test_divergence_message_names_the_backup_a_rerun_resumes(tmp_path):
    from keras_irtf.training.backup import StopOnNonFiniteLoss, TrainingBackup, TrainingDiverged

    model = _tiny_model()
    backup = TrainingBackup(tmp_path / "backup", every_steps=5)
    backup.set_model(model)
    _step(model, 5)
    backup.on_train_batch_end(0, {"loss": 0.5})
    stop = StopOnNonFiniteLoss(backup)
    stop.set_model(model)
    _step(model, 7)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 7: loss=nan.*last backup, from step 5, "
                                               r"passed the finiteness check.*--fresh"):
        stop.on_train_batch_end(0, {"loss": math.nan})
    empty = StopOnNonFiniteLoss(TrainingBackup(tmp_path / "none"))
    empty.set_model(model)
    with pytest.raises(TrainingDiverged, match="no backup was kept"):
        empty.on_train_batch_end(0, {"loss": math.inf})
    # a backup callback created on a folder with a backup knows its step (a resumed run)
    assert TrainingBackup(tmp_path / "backup").last_good_step == 5
