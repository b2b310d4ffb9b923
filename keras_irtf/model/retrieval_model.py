"""ComposedRetrievalModel: image encoder + text encoder -> composer -> scaled L2 normalisation.

The query embedding composes the source image with the modification text; the target embedding
is the target image through the same image encoder and the same normalisation. `train_step`
computes the paper's total loss

    L_all = L_CE + eta * L_S + L_GA^A + L_GA^I   (+ the FGSM / PGD / L1 / L2 baselines when chosen)

in one place (`compute_loss_terms`) so that `model.fit` from a user script and
`tools/train.py` train the same way. Batches are dicts (see keras_irtf.data.pipeline).

Mixed precision (`precision`, keras_irtf.precision): the encoders and the composer compute
in the policy; the features are cast to float32 before the normalisation, so the embeddings, the
logits and every loss are float32. Under "mixed_float16" the optimizer is a LossScaleOptimizer
and train_step differentiates the SCALED loss (the inner tape of GA^A too), unscales the
gradients before the isotropic noise is added, and counts the steps the optimizer skips because
the scaled gradients were not finite ("skipped_steps"); the logged losses are unscaled and
average the applied steps.

Under tf.distribute every loss term is divided by the global batch, and the optimizer's clipping
(optim.clipnorm) applies to the summed gradient, as on one device
(keras_irtf.model.optimizers.clip_global_gradients); docs/distributed.md states what a
multi-replica run reproduces.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_irtf.config import ConfigError
from keras_irtf import losses as L
from keras_irtf import precision as P
from keras_irtf.model.gradient_augmentation import GAContext, GradientAugmentation
from keras_irtf.model.optimizers import clip_global_gradients
from keras_irtf.layers.normalization import ScaledL2Normalization


_MERGING_LAYERS = (keras.layers.Add, keras.layers.Average, keras.layers.Concatenate, keras.layers.Dot,
                   keras.layers.Maximum, keras.layers.Minimum, keras.layers.Multiply, keras.layers.Subtract)


class UnbuiltSublayerError(ConfigError):
    """A component whose build() left a weight-holding sub-layer unbuilt."""


def _holds_weights_once_built(layer) -> bool:
    """Layers whose build() creates variables: they override Layer.build (Dense, LSTM, ...);
    merging layers (Concatenate, Add) override it only to check shapes; keras-hub's
    preprocessors and tokenizers override it but hold no trainable weights and stay unbuilt."""
    if _is_keras_hub_preprocessing(layer):
        return False
    return type(layer).build is not keras.layers.Layer.build and not isinstance(layer, _MERGING_LAYERS)


def _is_keras_hub_preprocessing(layer) -> bool:
    cls = type(layer)
    return cls.__module__.startswith("keras_hub.") and any(
        base.__name__ in ("Preprocessor", "Tokenizer") for base in cls.__mro__)


def check_sublayers_built(component):
    """Raise UnbuiltSublayerError when `component` (an encoder or a composer, built) holds a
    sub-layer with weights that its build() did not build. Keras would then create that
    layer's variables inside the first traced training step, after the optimizer was built
    for the model's variables, and training fails at step 1 with an error far from the cause."""
    unbuilt = [layer for layer in component._flatten_layers(include_self=False)
               if not layer.built and _holds_weights_once_built(layer)]
    if unbuilt:
        names = ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in unbuilt[:5])
        raise UnbuiltSublayerError(
            f"{type(component).__name__} ({component.name}) did not build its sub-layer(s) {names} in build(). "
            f"A keras_irtf component must create and build every sub-layer that holds weights in its build(input_shape), "
            f"e.g. self.dense.build(shape), as docs/python-api.md ('Plug-ins') shows; otherwise their weights would be "
            f"created inside the first training step, which fails"
        )


@keras.saving.register_keras_serializable(package="keras_irtf")
class ComposedRetrievalModel(keras.Model):
    def __init__(self, image_encoder, text_encoder, composer, normalization=None,
                 gradient_augmentation=None, retrieval_loss="batch_classification", eta=0.0,
                 similarity_reduction="sum", image_size=None, max_text_length=None, precision="float32",
                 **kwargs):
        super().__init__(**kwargs)
        self.precision = P.check_precision(precision)
        L.retrieval_loss(retrieval_loss)  # an unknown name fails here, listing the registered ones
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.composer = composer
        self.normalization = normalization or ScaledL2Normalization(name="normalization")
        self.gradient_augmentation = gradient_augmentation or GradientAugmentation(name="gradient_augmentation")
        self.retrieval_loss = retrieval_loss
        self.eta = float(eta)
        self.similarity_reduction = similarity_reduction
        self._trackers = {name: keras.metrics.Mean(name=name) for name in self.loss_term_names()}
        if P.uses_loss_scaling(self.precision):
            # steps whose scaled gradients were not finite: the LossScaleOptimizer skipped them
            # (and halved its scale); counted per epoch, not a divergence
            self._trackers["skipped_steps"] = keras.metrics.Sum(name="skipped_steps")
        # Built here when the input sizes are known: Keras' own symbolic build in `fit` passes
        # no shapes for dict inputs and leaves sub-layers to be built inside the traced step.
        self.image_size = image_size
        self.max_text_length = max_text_length
        if image_size and max_text_length:
            # under the run's policy: parts that create sub-layers in build() (ResNet's shortcut,
            # ComposeAE's text decoder) give them the global policy of that moment
            with P.policy_scope(self.precision):
                self.build(self.input_shapes())

    def input_shapes(self):
        s, n = int(self.image_size), int(self.max_text_length)
        return {"source_image": (None, s, s, 3), "text": (None, n), "target_image": (None, s, s, 3)}

    def build(self, input_shape=None):
        """input_shape: the batch dict's shapes ({"source_image": (B, H, W, 3), "text": (B, L)}).

        Keras passes no shape for dict inputs during `fit`'s symbolic build, so construct the
        model with `image_size` and `max_text_length` (as `build_model` does) or call
        `model.build(shapes)` before `fit`.
        """
        if not input_shape:
            raise ValueError(
                "ComposedRetrievalModel needs its input sizes to build: pass image_size= and "
                "max_text_length= to the constructor (keras_irtf.build_model does), or call "
                "model.build({'source_image': (None, S, S, 3), 'text': (None, L)}) before fit()."
            )
        image_shape = tuple(input_shape["source_image"])
        text_shape = tuple(input_shape["text"])
        for layer, shape in ((self.image_encoder, image_shape), (self.text_encoder, text_shape)):
            if not layer.built:
                layer.build(shape)
        f_img = self.image_encoder.compute_output_shape(image_shape)
        f_text = self.text_encoder.compute_output_shape(text_shape)
        if not self.composer.built:
            self.composer.build([f_img, f_text])
        if not self.normalization.built:
            self.normalization.build(self.composer.compute_output_shape([f_img, f_text]))
        for part in (self.image_encoder, self.text_encoder, self.composer):
            check_sublayers_built(part)
        self.built = True
        self.gradient_augmentation.attach(self)  # methods that look at the variables (GA^I's exclude)

    # ---- embeddings ---------------------------------------------------------------------------
    def encode_image(self, images, training=False):
        return self.image_encoder(images, training=training)

    def encode_text(self, tokens, training=False):
        return self.text_encoder(tokens, training=training)

    def compose(self, image_features, text_features, training=False):
        return self.composer([image_features, text_features], training=training)

    def normalize(self, features):
        """The scaled L2 normalisation, in float32 whatever the precision policy (a float32 norm
        and scale; the embeddings, logits and losses downstream are float32)."""
        return self.normalization(P.at_least_float32(features))

    def embed_queries(self, images, tokens, training=False):
        """Normalised query embeddings of (source image, text), float32."""
        f = self.compose(self.encode_image(images, training), self.encode_text(tokens, training), training)
        return self.normalize(f)

    def embed_images(self, images, training=False):
        """Normalised embeddings of gallery (target) images, float32."""
        return self.normalize(self.encode_image(images, training))

    def call(self, inputs, training=False):
        out = {"query": self.embed_queries(inputs["source_image"], inputs["text"], training)}
        if "target_image" in inputs:
            out["target"] = self.embed_images(inputs["target_image"], training)
        return out

    # ---- losses -------------------------------------------------------------------------------
    def loss_term_names(self):
        names = ["loss", "retrieval_loss"]
        if self.eta > 0:
            names.append("similarity_loss")
        names += list(getattr(self.composer, "auxiliary_loss_names", ()))
        names += self.gradient_augmentation.term_names()
        names += [n for n in self.gradient_augmentation.metric_names() if n not in names]
        return names

    def _query_branch(self, batch, training, tape=None, delta=None):
        """f_comp (unnormalised) and the tensor x at the GA point (watched by `tape`, shifted by
        `delta` when given: the FGSM pass)."""
        point = self.gradient_augmentation.point
        x = None

        def at(name, h):
            nonlocal x
            if name == point:
                if delta is not None:
                    h = h + tf.cast(delta, h.dtype)  # (delta is float32; h may be 16-bit)
                if tape is not None:
                    tape.watch(h)
                x = h
            return h

        src = at("input", tf.convert_to_tensor(batch["source_image"]))
        f_img = at("image_feature", self.encode_image(src, training))
        f_text = at("text_feature", self.encode_text(batch["text"], training))
        f_comp = at("composed", self.compose(f_img, f_text, training))
        return f_comp, x, {"image": f_img, "text": f_text}

    def _main_loss(self, f_comp, f_target, target, features, batch, training, terms):
        """L_CE + eta * L_S (+ the composer's own terms), recording each in `terms`."""
        query = self.normalize(f_comp)
        main = L.retrieval_loss(self.retrieval_loss)(query, target)
        terms["retrieval_loss"] = main
        if self.eta > 0:
            ls = L.similarity_matching_loss(query, target, self.similarity_reduction)
            terms["similarity_loss"] = ls
            main = main + self.eta * ls
        if hasattr(self.composer, "auxiliary_losses"):
            aux = self.composer.auxiliary_losses(
                model=self, batch=batch, features=features, composed=f_comp, target_features=f_target,
                query=query, target=target, training=training,
            )
            for name, value in aux.items():  # already weighted by the composer
                terms[name] = value
                main = main + value
        return main

    def loss_scale(self):
        """The LossScaleOptimizer's current scale (float32 scalar), or None without loss scaling."""
        opt = getattr(self, "optimizer", None)
        if isinstance(opt, keras.optimizers.LossScaleOptimizer):
            return tf.convert_to_tensor(opt.dynamic_scale if opt.built else opt.initial_scale, tf.float32)
        return None

    def compute_loss_terms(self, batch, training=True, loss_scale=None):
        """Every loss term of the batch (each divided by the GLOBAL batch); terms["loss"] is the
        differentiable total. In training, the active GA methods act through their hooks
        (keras_irtf.model.gradient_augmentation.GAMethod): `main_loss`, then `loss_terms`; the
        gradient hooks run in train_step.

        loss_scale: under mixed_float16 (train_step passes the optimizer's), dL/dx is taken of
        the SCALED loss, so that small 16-bit gradients do not underflow, then cast to float32
        and divided by the scale before any GA method sees it: the penalty does not depend on
        the scale."""
        ga = self.gradient_augmentation
        terms = {}
        f_target = self.encode_image(batch["target_image"], training)
        target = self.normalize(f_target)
        grad_x = None
        if ga.needs_input_gradient and training:
            # inner tape: dL/dx (recorded by the caller's outer tape -> double backprop)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                f_comp, x, feats = self._query_branch(batch, training, tape=inner)
                main = self._main_loss(f_comp, f_target, target, feats, batch, training, terms)
                scaled = main if loss_scale is None else main * loss_scale
            grad_x = P.at_least_float32(inner.gradient(scaled, x))
            if loss_scale is not None:
                grad_x = grad_x / tf.cast(loss_scale, grad_x.dtype)
        else:
            f_comp, x, feats = self._query_branch(batch, training)
            main = self._main_loss(f_comp, f_target, target, feats, batch, training, terms)
        total = main
        if training and ga.active:
            def loss_at(delta):
                f_shift, _, feats_shift = self._query_branch(batch, training, delta=delta)
                return self._main_loss(f_shift, f_target, target, feats_shift, batch, training, {})

            ctx = GAContext(self, batch, training, terms, f_target, target, grad_x=grad_x, loss_at=loss_at, x=x,
                            loss_scale=loss_scale)
            for method in ga.active:
                main = method.main_loss(ctx, main)
            total = main
            for method in ga.active:
                for name, value in method.loss_terms(ctx).items():
                    terms[name] = terms[name] + value if name in terms else value
                    total = total + value
        terms["loss"] = total
        return terms

    def train_step(self, data):
        batch = data[0] if isinstance(data, (tuple, list)) else data
        variables = self.trainable_variables
        scale = self.loss_scale()  # None unless mixed_float16 (LossScaleOptimizer)
        with tf.GradientTape() as tape:
            terms = self.compute_loss_terms(batch, training=True, loss_scale=scale)
            loss = terms["loss"] if scale is None else terms["loss"] * scale
        grads = tape.gradient(loss, variables)
        replicas, _ = L.replica_info()
        if scale is not None:
            # a step is skipped when its scaled gradients are not finite, or its scaled loss: an
            # overflow in GA^A's inner (scaled) gradient leaves dL/dx and so the penalty undefined
            # even where the outer gradients happen to stay finite
            finite = tf.logical_and(self.optimizer.check_finite(grads), tf.reduce_all(tf.math.is_finite(loss)))
            skipped = 1.0 - tf.cast(finite, tf.float32)
            if replicas > 1:
                # skipped when ANY replica overflowed, and every replica knows it: the
                # LossScaleOptimizer takes its decision from one replica's gradients
                ctx = tf.distribute.get_replica_context()
                skipped = tf.minimum(ctx.all_reduce(tf.distribute.ReduceOp.SUM, skipped), 1.0)
                finite = skipped < 0.5
            # unscale here, so that the gradient hooks (the isotropic noise) act on the true
            # gradients: the noise must not be multiplied by the loss scale
            grads = [None if g is None else g / scale for g in grads]
        for method in self.gradient_augmentation.active:
            grads, logged = method.transform_gradients(grads, variables)
            for name, value in logged.items():  # e.g. L_GA^I = sum_v noise_v . v
                terms[name] = value
                if name not in method.metric_names:  # a loss term (not a diagnostic such as a ratio)
                    terms["loss"] = terms["loss"] + tf.cast(value, terms["loss"].dtype)
        # optimizer clipping (optim.clipnorm) acts on the global gradient, as on one device: Keras
        # would clip each replica's share before the sum (no-op on one device or without clipping)
        grads = clip_global_gradients(self.optimizer, grads)
        if scale is not None:
            # the LossScaleOptimizer divides by its scale, skips the update when a gradient is not
            # finite and adapts the scale: hand it scaled gradients again (the scale is a power of
            # two, so g * s / s is exactly g and the noise reaches the variables unscaled); a step to
            # skip gets NaN gradients, so that the optimizer skips it as it skips an overflow
            nan = tf.constant(float("nan"), tf.float32)
            grads = [None if g is None else tf.where(finite, g * scale, tf.cast(nan, g.dtype)) for g in grads]
            terms["skipped_steps"] = skipped
        self.optimizer.apply(grads, variables)
        return self._record(terms)

    def test_step(self, data):
        batch = data[0] if isinstance(data, (tuple, list)) else data
        return self._record(self.compute_loss_terms(batch, training=False))

    def _record(self, terms):
        # terms are per-replica shares of a global mean; the trackers average over replicas
        replicas, _ = L.replica_info()
        weight = None
        if "skipped_steps" in terms:
            # the logged terms average the APPLIED steps: a step skipped for an overflow of the
            # scaled gradients (its GA^A penalty may be NaN) is only counted, so that
            # StopOnNonFiniteLoss does not take it for a divergence; a non-finite unscaled
            # retrieval loss is a real divergence and is recorded as it is
            diverged = tf.logical_not(tf.reduce_all(tf.math.is_finite(terms["retrieval_loss"])))
            weight = tf.where(tf.logical_or(terms["skipped_steps"] < 0.5, diverged), 1.0, 0.0)
        for name, tracker in self._trackers.items():
            if name not in terms:
                continue
            if name == "skipped_steps":  # a count, equal on every replica; the tracker sums the replicas
                tracker.update_state(terms[name] / replicas)
            elif weight is None:
                tracker.update_state(tf.cast(terms[name], tf.float32) * replicas)
            else:
                value = tf.cast(terms[name], tf.float32) * replicas
                tracker.update_state(tf.where(weight > 0, value, 0.0), sample_weight=weight)
        return {name: t.result() for name, t in self._trackers.items()}

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 (keras#20585): under a strategy, fit() pulls a batch and all-reduces it only
        # to build the model; that fails under MultiWorkerMirroredStrategy and consumes a batch.
        # This model is built at construction and train() builds the optimizer, so skip it then.
        if self.built and (self.optimizer is None or self.optimizer.built) and keras.__version__.startswith("3.15"):
            return
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    @property
    def metrics(self):
        return list(self._trackers.values())

    # ---- serialisation ------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        ser = keras.saving.serialize_keras_object
        config.update(
            image_encoder=ser(self.image_encoder),
            text_encoder=ser(self.text_encoder),
            composer=ser(self.composer),
            normalization=ser(self.normalization),
            gradient_augmentation=ser(self.gradient_augmentation),
            retrieval_loss=self.retrieval_loss,
            eta=self.eta,
            similarity_reduction=self.similarity_reduction,
            image_size=self.image_size,
            max_text_length=self.max_text_length,
            precision=self.precision,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        de = keras.saving.deserialize_keras_object
        # the parts' sub-layers take the global policy when they are created: rebuild them under
        # the run's (the normalisation and GA store their own float32 policy)
        with P.policy_scope(config.get("precision", "float32")):
            for key in ("image_encoder", "text_encoder", "composer", "normalization", "gradient_augmentation"):
                config[key] = de(config[key])
        return cls(**config)
