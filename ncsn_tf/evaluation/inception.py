"""Feature networks for FID and Inception Score, behind one interface (`FeatureNetwork`).

- `tfgan`: the TF-GAN Inception graph (tfhub.dev/tensorflow/tfgan/eval/inception/1), the
  network of score_sde and of TTUR-style published FIDs: outputs `pool_3` [B, 2048] and
  `logits` [B, 1008]. Loaded from a local SavedModel folder, or downloaded once into a cache.
- `keras`: `keras.applications.InceptionV3` with ImageNet weights: the 2048 average-pool
  features and the 1000-class logits. Close to, but not the same network as, `tfgan`.
- `random-test`: a small seeded random conv net for tests. Not Inception.

The user picks one (`load_feature_network("tfgan:PATH" | "keras[:WEIGHTS]" | "random-test")`);
nothing falls back silently to another network, because scores from different networks are
not comparable. Every network has a `name`, recorded with every statistic and metric.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import uuid
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

TFGAN_INCEPTION_URL = "https://tfhub.dev/tensorflow/tfgan/eval/inception/1"
KERAS_INCEPTION_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/"
                       "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5")
KERAS_INCEPTION_MD5 = "9a0d58056eeedaa3f26cb7ebd46da564"
INCEPTION_IMAGE_SIZE = 299
DOWNLOAD_TIMEOUT_S = 20.0

SPECS = "tfgan | tfgan:PATH | keras | keras:WEIGHTS.h5 | random-test"


class FeatureNetworkUnavailable(RuntimeError):
    """The requested feature network cannot be loaded; the message says how to get it."""


# Takes float32 images in [-1, 1] of shape [B, S, S, 3]; returns (features, logits or None).
Forward = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor | None]]


class FeatureNetwork:
    """Images → (pool features [B, D], logits [B, K] or None) as NumPy float32.

    Input: uint8 [B, H, W, C] or float in [0, 1], C in {1, 3} (grey is repeated to RGB).
    Floats are quantised to 256 levels first, so an array of samples and the PNG files
    written from it give the same features. Then, when the network has a fixed input size,
    images are resized bilinearly to it, and scaled to [-1, 1].
    """

    def __init__(self, name: str, forward: Forward, *, image_size: int | None,
                 num_features: int, num_classes: int | None):
        self.name = name
        self.image_size = image_size
        self.num_features = num_features
        self.num_classes = num_classes
        self._forward = forward
        self._run = tf.function(
            self._preprocess_and_forward,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])

    def __repr__(self) -> str:
        return f"FeatureNetwork({self.name!r})"

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        pool, logits = self._run(tf.convert_to_tensor(to_uint8_rgb(images)))
        return pool.numpy(), None if logits is None else logits.numpy()

    def _preprocess_and_forward(self, images):
        x = tf.cast(images, tf.float32)
        if self.image_size is not None:
            x = tf.image.resize(x, [self.image_size, self.image_size], method="bilinear")
        return self._forward(x / 127.5 - 1.0)


def to_uint8_rgb(images) -> np.ndarray:
    """uint8 [B, H, W, 3] from uint8 or [0, 1]-float NHWC images with 1 or 3 channels."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Expected images [B, H, W, 1 or 3]; got shape {images.shape}.")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"Expected uint8 or float images; got dtype {images.dtype}.")
        low, high = float(images.min(initial=0.0)), float(images.max(initial=0.0))
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"Float images must be in [0, 1]; got values in [{low:.3g}, "
                             f"{high:.3g}]. Rescale them (e.g. (x + 1) / 2 for [-1, 1]).")
        images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def load_feature_network(spec: str, *, cache_dir: str | None = None) -> FeatureNetwork:
    """The network named by `spec`: tfgan | tfgan:PATH | keras | keras:WEIGHTS.h5 | random-test."""
    kind, _, arg = spec.partition(":")
    if kind == "tfgan":
        return tfgan_inception(arg or None, cache_dir=cache_dir)
    if kind == "keras":
        return keras_inception(arg or None)
    if kind == "random-test" and not arg:
        return random_test_network()
    raise ValueError(f"Unknown feature network {spec!r}; expected one of: {SPECS}.")


# --- TF-GAN Inception (TF-Hub SavedModel) ---------------------------------------------------

def default_cache_dir() -> str:
    """Where downloaded networks are kept: $NCSN_TF_CACHE, else ~/.cache/ncsn_tf."""
    return os.environ.get("NCSN_TF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ncsn_tf")


def _tfgan_instructions(cache_folder: str) -> str:
    return (
        "To get it, on a machine with internet access run\n"
        f"  mkdir -p inception && curl -L '{TFGAN_INCEPTION_URL}?tf-hub-format=compressed' "
        "| tar -xz -C inception\n"
        "then either pass --inception=tfgan:/path/to/inception (the folder holding "
        f"saved_model.pb) or copy that folder to {cache_folder} so that --inception=tfgan "
        "finds it. Alternatively use --inception=keras (Keras' InceptionV3; its FIDs are not "
        "comparable to published ones).")


def tfgan_inception(path: str | None = None, *, cache_dir: str | None = None) -> FeatureNetwork:
    """TF-GAN's Inception from a SavedModel folder (or its .tar.gz); None: cache, else download."""
    cache_folder = os.path.join(cache_dir or default_cache_dir(), "tfgan_eval_inception_1")
    if path is None:
        if not _is_saved_model(cache_folder):
            archive = cache_folder + ".tar.gz"
            _download(f"{TFGAN_INCEPTION_URL}?tf-hub-format=compressed", archive,
                      what="the TF-GAN Inception network",
                      instructions=_tfgan_instructions(cache_folder))
            _extract(archive, cache_folder)
            os.remove(archive)
        path = cache_folder
    elif path.endswith((".tar.gz", ".tgz")) and os.path.isfile(path):
        _extract(path, cache_folder)
        path = cache_folder
    if not _is_saved_model(path):
        raise FeatureNetworkUnavailable(
            f"The TF-GAN Inception network was requested from {path}, but that is not a "
            f"SavedModel folder (no saved_model.pb).\n{_tfgan_instructions(cache_folder)}")
    module = tf.saved_model.load(path)
    call = _module_call(module, path)

    def forward(x):
        outputs = call(x)
        missing = {"pool_3", "logits"} - set(outputs)
        if missing:
            raise FeatureNetworkUnavailable(
                f"The SavedModel at {path} has outputs {sorted(outputs)}, not 'pool_3' and "
                f"'logits': it is not TF-GAN's Inception.\n{_tfgan_instructions(cache_folder)}")
        batch = tf.shape(x)[0]
        return (tf.reshape(tf.cast(outputs["pool_3"], tf.float32), [batch, -1]),
                tf.reshape(tf.cast(outputs["logits"], tf.float32), [batch, -1]))

    return FeatureNetwork("tfgan/eval/inception/1 (TF-GAN Inception, pool_3 / 1008 logits)",
                          forward, image_size=INCEPTION_IMAGE_SIZE, num_features=2048,
                          num_classes=1008)


def _is_saved_model(path: str) -> bool:
    return tf.io.gfile.exists(os.path.join(path, "saved_model.pb"))


def _module_call(module, path: str) -> Callable[[tf.Tensor], dict]:
    """A function images → dict of outputs: the module itself, or its 'default' signature."""
    if callable(module):
        return module
    signature = getattr(module, "signatures", {}).get("default")
    if signature is None:
        raise FeatureNetworkUnavailable(f"The SavedModel at {path} is neither callable nor has "
                                        "a 'default' signature; it is not TF-GAN's Inception.")
    (input_name,) = signature.structured_input_signature[1]
    return lambda x: signature(**{input_name: x})


def _extract(archive: str, folder: str) -> None:
    """Unpacks a .tar.gz into `folder`, atomically (a partial unpack is never seen as a model)."""
    tmp = f"{folder}.tmp-{uuid.uuid4().hex}"
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter="data")
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- Keras InceptionV3 ------------------------------------------------------------------------

def keras_inception(weights: str | None = None) -> FeatureNetwork:
    """keras.applications.InceptionV3: 2048 avg-pool features and 1000 ImageNet logits.

    `weights`: the .h5 file with top (default: Keras' cache, downloaded there if missing).
    """
    cached = os.path.join(os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras"),
                          "models", os.path.basename(KERAS_INCEPTION_URL))
    instructions = (
        f"Download {KERAS_INCEPTION_URL} (md5 {KERAS_INCEPTION_MD5}) on a machine with internet "
        f"access and either put it at {cached} (Keras' cache) or pass "
        "--inception=keras:/path/to/inception_v3_weights_tf_dim_ordering_tf_kernels.h5.")
    if weights is None:
        if not os.path.isfile(cached):
            _download(KERAS_INCEPTION_URL, cached, what="Keras' InceptionV3 ImageNet weights",
                      instructions=instructions)
            if _md5(cached) != KERAS_INCEPTION_MD5:
                os.remove(cached)
                raise FeatureNetworkUnavailable(
                    f"The download of {KERAS_INCEPTION_URL} is corrupt (md5 mismatch).\n"
                    f"{instructions}")
        weights = cached
    if not os.path.isfile(weights):
        raise FeatureNetworkUnavailable(
            f"No InceptionV3 weights file at {weights}.\n{instructions}")
    official = _md5(weights) == KERAS_INCEPTION_MD5
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")  # features in full precision under bf16 training
    try:
        model = keras.applications.InceptionV3(weights=None, classifier_activation=None)
        model.load_weights(weights)
    finally:
        keras.config.set_dtype_policy(policy)
    features_and_logits = keras.Model(model.input,
                                      [model.get_layer("avg_pool").output, model.output])

    def forward(x):
        return tuple(features_and_logits(x, training=False))

    source = "ImageNet weights" if official else f"weights {os.path.basename(weights)}"
    return FeatureNetwork(f"keras.applications.InceptionV3 ({source}, avg_pool / 1000 logits)",
                          forward, image_size=INCEPTION_IMAGE_SIZE, num_features=2048,
                          num_classes=1000)


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- random test network --------------------------------------------------------------------

def random_test_network(seed: int = 0, num_classes: int = 10) -> FeatureNetwork:
    """A seeded random 3-layer conv net (128 features): fast and deterministic, for tests only."""
    rng = np.random.default_rng(seed)
    channels = [3, 32, 64, 128]
    kernels = [tf.constant(rng.normal(0.0, np.sqrt(2.0 / (9 * c_in)), (3, 3, c_in, c_out)),
                           tf.float32) for c_in, c_out in zip(channels[:-1], channels[1:])]
    head = tf.constant(rng.normal(0.0, np.sqrt(2.0 / channels[-1]), (channels[-1], num_classes)),
                       tf.float32)

    def forward(x):
        for i, kernel in enumerate(kernels):
            x = tf.nn.relu(tf.nn.conv2d(x, kernel, strides=1 if i == 0 else 2, padding="SAME"))
        features = tf.reduce_mean(x, axis=[1, 2])
        return features, features @ head

    return FeatureNetwork(f"random-test-network(seed={seed}) (NOT Inception; numbers are not "
                          "comparable to published FID/IS)", forward, image_size=None,
                          num_features=channels[-1], num_classes=num_classes)


# --- downloads --------------------------------------------------------------------------------

def _download(url: str, target: str, *, what: str, instructions: str) -> None:
    """Fetches `url` into `target` (atomically), or raises FeatureNetworkUnavailable at once."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.part-{uuid.uuid4().hex}"
    logging.info("Downloading %s from %s", what, url)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as error:
        raise FeatureNetworkUnavailable(
            f"{what[0].upper()}{what[1:]} is not available locally and could not be downloaded "
            f"from {url} ({error}).\n{instructions}") from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logging.info("Saved %s to %s", what, target)
