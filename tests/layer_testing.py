"""Shared checks for layers and models (in the spirit of keras-hub's run_layer_test)."""

import numpy as np
import keras
import tensorflow as tf


def run_layer_test(layer_cls, init_kwargs, inputs, expected_output_shape, tmp_path=None, train=True):
    """Build + call, compare to compute_output_shape, serialise/deserialise (config and .keras
    round trip give identical outputs), and one gradient step that changes the weights."""
    layer = layer_cls(**init_kwargs)
    out = layer(inputs, training=False)
    assert tuple(out.shape) == tuple(expected_output_shape)
    if isinstance(inputs, (list, tuple)):
        shapes = [tuple(x.shape) for x in inputs]
    else:
        shapes = tuple(inputs.shape)
    assert tuple(layer.compute_output_shape(shapes)) == tuple(expected_output_shape)

    # config round trip: same class, same config, same outputs with copied weights
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    clone(inputs, training=False)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(inputs, training=False), out, rtol=1e-6, atol=1e-6)
    assert clone.get_config() == config

    # registered for .keras serialisation: the serialized form names our package
    ser = keras.saving.serialize_keras_object(layer)
    assert ser["registered_name"].startswith("keras_irtf>"), ser["registered_name"]
    if tmp_path is not None:
        inp = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        sym = [keras.Input(shape=x.shape[1:], dtype=x.dtype, batch_size=x.shape[0]) for x in inp]
        model = keras.Model(sym, layer(sym if isinstance(inputs, (list, tuple)) else sym[0]))
        path = tmp_path / f"{layer_cls.__name__}.keras"
        model.save(path)
        reloaded = keras.saving.load_model(path)
        np.testing.assert_allclose(reloaded(inputs), model(inputs), rtol=1e-6, atol=1e-6)

    if train and layer.trainable_weights:
        before = [w.numpy().copy() for w in layer.trainable_weights]
        opt = keras.optimizers.SGD(0.1)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(inputs, training=True)))
        grads = tape.gradient(loss, layer.trainable_weights)
        opt.apply([g for g in grads if g is not None], [w for g, w in zip(grads, layer.trainable_weights) if g is not None])
        changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, layer.trainable_weights)]
        assert any(changed)
    return layer
