"""The SavedModel's signatures: `ServingModule` holds the network's weights and serves them.

    serving_default       seed int64 [N]                 -> images uint8 [N, H, W, C],
                                                            png_bytes string [N]
    sample_with_settings  seed int64 [N], n_steps_each int32 [], step_lr float32 [],
                          denoise bool []                -> images, png_bytes
    inpaint               image float32 [N, H, W, C] in [0, 1], mask float32 [N, H, W, 1 or C]
                          (1 = keep the pixel, 0 = fill it in), seed int64 [N]
                                                         -> images, png_bytes
    sampler_settings      seed int64 [N] (ignored: TF Serving needs an input)
                                                         -> json string []: what
                          serving_default does (sampler, NFE, settings, bounds, step)
    score                 x float32 [N, H, W, C] in [0, 1], noise_level int32 [N] (index into
                          the σ table)                   -> score float32 [N, H, W, C]

`serving_default` runs the config's sampler (`config.sampling`: ald, cas, pc, heun or dpm, with
its settings), `sample_with_settings` annealed Langevin dynamics with the request's T and ε,
`inpaint` the config's sampler (ald when that one is deterministic: heun, or dpm with eta = 0).
One image per seed; the same seed gives the same image whatever else is in the request. The
whole run is one graph (a `tf.while_loop`), plain TensorFlow ops (no Python at serving time, no
XLA). Requests outside the `ServingLimits` fixed at export time (1 to `max_batch` seeds or
images, 1 to `max_n_steps_each` steps per level, 0 < step_lr <= σ_L², images of the model's
shape with values in [0, 1], a 0/1 mask) fail with InvalidArgument and a message saying what is
wrong.
"""
from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import tensorflow as tf

from ncsn_tf import images as image_io
from ncsn_tf import sampling
from ncsn_tf.config import presets
from ncsn_tf.sampling.driver import checked

SIGNATURES = ("serving_default", "sample_with_settings", "inpaint", "score", "sampler_settings")
DEFAULT_MAX_N_STEPS_EACH = 20  # 4x the largest official T; a request costs L·T network calls


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """The bounds every signature enforces: seeds (or images) per request, at most
    `max_batch` (None: the config's sampling_batch_size), and steps per level of
    sample_with_settings."""
    max_batch: int | None = None
    max_n_steps_each: int = DEFAULT_MAX_N_STEPS_EACH


class ServingModule(tf.Module):
    """What the SavedModel holds: the network's weights, `step` and the four signatures.

    `net(x, labels, training=False)` is traced once as a graph function that every signature
    calls. Only the weights are tracked (not the Keras model), so loading needs neither Keras
    nor ncsn_tf.
    """

    def __init__(self, net: keras.Model, config: presets.Config, step: int,
                 limits: ServingLimits = ServingLimits()):
        super().__init__(name="ncsn")
        size, channels = config.data.image_size, config.data.channels
        self.image_shape = (size, size, channels)
        sigmas = net.sigmas.numpy().astype(np.float64)
        self.num_levels = len(sigmas)
        self.max_step_lr = float(sigmas[-1] ** 2)
        if limits.max_batch is None:
            limits = dataclasses.replace(limits, max_batch=config.sampling.sampling_batch_size)
        _check(config.sampling, limits, self.max_step_lr)
        self.limits = limits
        self.net_weights = [w.value for w in net.weights]  # plain tf.Variables
        self.step = tf.Variable(step, dtype=tf.int64, trainable=False, name="step")

        score_fn = tf.function(
            lambda x, labels: net(x, labels, training=False),
            input_signature=[tf.TensorSpec([None, *self.image_shape], tf.float32),
                             tf.TensorSpec([None], tf.int32)])
        sampling_config = config.sampling
        common = dict(shape=self.image_shape, n_steps_each=sampling_config.n_steps_each,
                      step_lr=sampling_config.step_lr)
        sigma_table = net.sigmas.value
        # Two samplers differ only in the final denoising step; `serving_default` uses the
        # exported setting, `sample_with_settings` chooses per request.
        self._samplers = {
            denoise: sampling.AnnealedLangevin(score_fn, sigma_table, denoise=denoise, **common)
            for denoise in (True, False)}
        # `serving_default` (and `inpaint`, where it can) runs the configured sampler.
        self.sampler_name = sampling_config.sampler
        if self.sampler_name == "ald":
            self._default = self._samplers[sampling_config.denoise]
        else:
            self._default = sampling.for_network(net, config)
        self.nfe = self._default.nfe()
        self._inpainter = (self._default if self._default.stochastic
                           else self._samplers[sampling_config.denoise])
        # A JSON string: tf.Module would wrap a dict attribute in a tracking wrapper.
        self.settings_json = json.dumps({
            "step": int(step),
            "image_shape": list(self.image_shape),
            "num_levels": self.num_levels,
            "sampler": {"name": self.sampler_name, "nfe": self.nfe,
                        "n_steps_each": sampling_config.n_steps_each,
                        "step_lr": sampling_config.step_lr, "denoise": sampling_config.denoise,
                        **sampling.settings(config), "inpaint": self._inpainter.name},
            "bounds": {"max_batch": limits.max_batch,
                       "max_n_steps_each": limits.max_n_steps_each,
                       "max_step_lr": self.max_step_lr},
            "signatures": list(SIGNATURES),
        })

    # ---- signatures ----

    # Inputs are declared without a rank and checked in the graph, so that a request of the
    # wrong shape gets a message saying which shape is expected, whoever calls the signature.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64, name="seed")])
    def serving_default(self, seed):
        seed = self._check_seeds(seed)
        return _image_outputs(self._default.sample(seed)["samples"])

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64, name="seed"),
                                  tf.TensorSpec([], tf.int32, name="n_steps_each"),
                                  tf.TensorSpec([], tf.float32, name="step_lr"),
                                  tf.TensorSpec([], tf.bool, name="denoise")])
    def sample_with_settings(self, seed, n_steps_each, step_lr, denoise):
        seed = self._check_seeds(seed)
        n_steps_each, step_lr = self._check_settings(n_steps_each, step_lr)
        x = self._samplers[True].init(seed)
        x = self._samplers[True].run_levels(x, seed, 0, self.num_levels,
                                            n_steps_each=n_steps_each, step_lr=step_lr)
        x = tf.cond(denoise, lambda: self._samplers[True].finish(x["samples"]),
                    lambda: self._samplers[False].finish(x["samples"]))
        return _image_outputs(x)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="image"),
                                  tf.TensorSpec(None, tf.float32, name="mask"),
                                  tf.TensorSpec(None, tf.int64, name="seed")])
    def inpaint(self, image, mask, seed):
        image = self._check_images(image, "image")
        image = _check_request(image, tf.reduce_all((image >= 0.0) & (image <= 1.0)),
                         "image values must be in [0, 1] (float32; divide uint8 pixels by 255)")
        n = tf.shape(image)[0]
        seed = _check_request(seed, (tf.rank(seed) == 1) & (tf.size(seed) == n),
                              "inpaint needs a list of seeds, one per image (shape [N]); got "
                              "seeds of shape, images:", tf.shape(seed), n, shape=[None])
        h, w, c = self.image_shape
        mask_shape = tf.shape(mask)
        mask = _check_request(mask, _shape_is(mask_shape, [n, h, w, 1])
                              | _shape_is(mask_shape, [n, h, w, c]),
                              f"mask must have shape [N, {h}, {w}, 1] or [N, {h}, {w}, {c}] for "
                              "N images (1 where the pixel is kept); got shape", mask_shape)
        mask = tf.ensure_shape(tf.broadcast_to(mask, tf.shape(image)), [None, h, w, c])
        return _image_outputs(self._inpainter.inpaint(image, mask, seed)["samples"])

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x"),
                                  tf.TensorSpec(None, tf.int32, name="noise_level")])
    def score(self, x, noise_level):
        x = self._check_images(x, "x")
        n = tf.shape(x)[0]
        noise_level = _check_request(
            noise_level, (tf.rank(noise_level) == 1) & (tf.size(noise_level) == n)
            & tf.reduce_all((noise_level >= 0) & (noise_level < self.num_levels)),
            f"noise_level must be a list of one index in [0, {self.num_levels}) per image "
            "(shape [N]); got", noise_level, shape=[None])
        return {"score": self._samplers[True].score_fn(x, noise_level)}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64, name="seed")])
    def sampler_settings(self, seed):
        """`settings_json`: what serving_default does (TF Serving needs an input; the seeds are
        ignored)."""
        del seed
        return {"json": tf.constant(self.settings_json)}

    # ---- request checks: InvalidArgument with a message, before any work is done ----

    def _check_seeds(self, seed):
        limit = self.limits.max_batch
        n = tf.size(seed)
        return _check_request(seed, (tf.rank(seed) == 1) & (n >= 1) & (n <= limit),
                              f"seed must be a list of 1 to {limit} seeds, one image per seed "
                              "(shape [N], e.g. [0, 1, 2]); got shape", tf.shape(seed),
                              shape=[None])

    def _check_settings(self, n_steps_each, step_lr):
        limit = self.limits.max_n_steps_each
        n_steps_each = _check_request(n_steps_each, (n_steps_each >= 1) & (n_steps_each <= limit),
                                f"n_steps_each must be in [1, {limit}]; got", n_steps_each)
        step_lr = _check_request(step_lr, (step_lr > 0.0) & (step_lr <= self.max_step_lr),
                           f"step_lr must be in (0, {self.max_step_lr:g}] (sigma_L^2: larger "
                           "steps diverge at the last noise level); got", step_lr)
        return n_steps_each, step_lr

    def _check_images(self, images, name):
        h, w, c = self.image_shape
        limit = self.limits.max_batch
        shape = tf.shape(images)
        return _check_request(images, _shape_is(shape, [None, h, w, c])
                              & (tf.size(images) > 0) & (tf.size(images) <= limit * h * w * c),
                              f"{name} must have shape [N, {h}, {w}, {c}] with 1 <= N <= "
                              f"{limit}; got shape", shape, shape=[None, h, w, c])

    def signature_functions(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        return {name: getattr(self, name).get_concrete_function() for name in SIGNATURES}


def _check(settings: presets.SamplingConfig, limits: ServingLimits, max_step_lr: float) -> None:
    """Raises ValueError, naming the flag, for sampler settings outside the limits."""
    problems = []
    if limits.max_batch < 1:
        problems.append(f"--max_batch={limits.max_batch} must be >= 1")
    if limits.max_n_steps_each < 1:
        problems.append(f"--max_n_steps_each={limits.max_n_steps_each} must be >= 1")
    if not 1 <= settings.n_steps_each <= limits.max_n_steps_each:
        problems.append(f"--n_steps_each={settings.n_steps_each} must be in "
                        f"[1, --max_n_steps_each={limits.max_n_steps_each}]")
    if not 0 < settings.step_lr <= max_step_lr:
        problems.append(f"--step_lr={settings.step_lr:g} must be in (0, sigma_L^2 = "
                        f"{max_step_lr:g}]")
    if problems:
        raise ValueError("Invalid export settings:\n  " + "\n  ".join(problems))


def _shape_is(shape: tf.Tensor, expected: list) -> tf.Tensor:
    """Whether the 1-D `shape` is `expected` (ints, scalar tensors, or None for any size),
    without indexing past the end of a shape of another rank."""
    def same():
        return tf.reduce_all(tf.stack([tf.equal(shape[i], d) for i, d in enumerate(expected)
                                       if d is not None]))
    return tf.cond(tf.equal(tf.size(shape), len(expected)), same, lambda: tf.constant(False))


def _check_request(value, condition, message: str, *data, shape: list | None = None):
    """`value`, after an in-graph check that fails with InvalidArgument(message, data); with
    `shape` (None: any size), reshaped to it only where `condition` holds, so that no shape
    error can come before the message (TensorFlow does not order EnsureShape after it)."""
    assertion = tf.debugging.Assert(condition, [message, *data], summarize=16)
    if shape is None:
        return checked(value, assertion)
    target = [-1 if d is None else d for d in shape]
    empty = [0 if d is None else d for d in shape]
    with tf.control_dependencies([assertion]):
        return tf.cond(condition, lambda: tf.reshape(value, target),
                       lambda: tf.zeros(empty, value.dtype))


def _image_outputs(samples):
    images = image_io.to_uint8(samples)
    return {"images": images,
            "png_bytes": tf.map_fn(tf.io.encode_png, images, fn_output_signature=tf.string)}


