"""An independent judge of digit samples that sees what a person sees: broken images too.

A small convolutional classifier is trained here, deterministically (fixed seeds, op
determinism), on the 1,600 training digits at the `digits` preset's 16 px, exactly as
`ncsn_tf.data` builds them, plus an eleventh class, "not a digit": images a person would call
broken, drawn fresh each epoch from `NOT_A_DIGIT` (uniform and Gaussian noise, flat images,
blurred blobs, digits drowned in noise). A classifier of digits alone maps noise to arbitrary
features, some near real digits; taught what broken looks like, it puts it far from them.
Its 64 penultimate ReLU features, scaled so that the training digits' features have unit mean
variance, play Inception's role:

- Fréchet distance and KID to the training digits (KID is unbiased at any sample size);
- improved precision and recall (k-NN manifolds, k = 3, Kynkäänniemi et al. 2019) and the
  per-sample realism score, which orders the worst samples;
- the broken-sample rate: samples the classifier calls "not a digit"; beside it the
  judge-free pixel criterion `noisy_rate` (mean absolute difference of neighbouring pixels
  above 0.2; training digits stay below 0.12), a cross-check;
- the mean confidence and the histogram of predicted digits (mode coverage).

Every number comes with a bootstrap 95% interval over the samples (`score`), so a difference
is called real only beyond it. `bench/judge_calibration.py` checks the judge on cases with a
known answer, including kinds of broken image it was not trained on, and commits the result.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from ncsn_tf.evaluation import metrics

K = 3  # neighbours of the k-NN manifolds
NOISY_ROUGHNESS = 0.2  # mean |neighbouring pixel difference| of a noise image; digits ≤ 0.12
FEATURES = 64
BOOTSTRAP = 200
_RANGE = {"frechet_distance": (0.0, np.inf), "kid": (-np.inf, np.inf)}  # others: [0, 1]


def digits_split(split: str, image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, H, W, 1] in [0, 1], labels [N]) of the digits `split` as ncsn_tf
    trains on them."""
    from sklearn.datasets import load_digits

    from ncsn_tf import data
    from ncsn_tf.config import presets
    config = presets.get("digits")
    config.data.image_size = image_size
    images = np.concatenate([b.numpy() for b in data.load(config, split, training=False,
                                                         batch_size=512)])
    targets = load_digits().target
    held_out = data.DIGITS_TEST_SIZE
    labels = targets[:len(targets) - held_out] if split == "train" else targets[-held_out:]
    return images, labels


def as_float(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 1] uint8 or float images → float32 in [0, 1] (NaN → 0: a broken pixel)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return np.clip(np.nan_to_num(images.astype(np.float32)), 0.0, 1.0)


def roughness(images: np.ndarray) -> np.ndarray:
    """Mean absolute difference between horizontally and vertically neighbouring pixels, per
    image: about 0.1 for a digit, above 0.2 for salt-and-pepper noise."""
    x = as_float(images)
    return 0.5 * (np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3))
                  + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3)))


NOT_A_DIGIT = 10  # the eleventh class
NOT_A_DIGIT_KINDS = ("uniform", "gaussian", "flat", "blobs", "drowned")


def not_a_digit(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One broken image per digit in `digits` ([N, 16, 16, 1] float), of the kinds in
    `NOT_A_DIGIT_KINDS` in turn: the judge's training examples of what is not a digit."""
    n = len(digits)
    kind = np.arange(n) % len(NOT_A_DIGIT_KINDS)
    shape = (n, 16, 16, 1)
    uniform = rng.uniform(size=shape)
    gaussian = 0.5 + rng.uniform(0.15, 0.5, (n, 1, 1, 1)) * rng.normal(size=shape)
    flat = np.broadcast_to(rng.uniform(size=(n, 1, 1, 1)), shape)
    coarse = rng.uniform(size=(n, 4, 4, 1))
    blobs = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    drowned = digits + rng.uniform(0.4, 1.0, (n, 1, 1, 1)) * rng.normal(size=shape)
    out = np.choose(kind[:, None, None, None], [uniform, gaussian, flat, blobs, drowned])
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _build_network(seed: int, classes: int = 11):
    import keras
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((16, 16, 1))
    h = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    h = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.Conv2D(64, 3, padding="same", activation="relu")(h)
    h = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(h)
    features = layers.Dense(FEATURES, activation="relu", name="features")(layers.Flatten()(h))
    logits = layers.Dense(classes, name="logits")(features)
    return keras.Model(inputs, [features, logits])


@dataclasses.dataclass
class DigitJudge:
    """The trained classifier and the training digits in its feature space."""
    network: object  # keras.Model: images → (features, logits)
    reference: np.ndarray  # features of the training digits
    reference_radii: np.ndarray  # their k-NN radii
    test_accuracy: float
    scale: float = 1.0  # features are divided by it: unit mean variance on the training digits

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features [N, 64], class probabilities [N, 11]; class 10 is "not a digit")."""
        x = as_float(images)
        features, probs = [], []
        for start in range(0, len(x), 500):
            f, logits = self.network(x[start:start + 500], training=False)
            features.append(np.asarray(f, np.float64) / self.scale)
            z = np.asarray(logits, np.float64)
            z = np.exp(z - z.max(axis=1, keepdims=True))
            probs.append(z / z.sum(axis=1, keepdims=True))
        return np.concatenate(features), np.concatenate(probs)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self(images)[0]

    def realism(self, images: np.ndarray) -> np.ndarray:
        """Per-image realism against the training digits (below 1: off their manifold)."""
        return metrics.realism_scores(self.reference, self.features(images), K,
                                      self.reference_radii)

    def score(self, images: np.ndarray, *, bootstrap: int = BOOTSTRAP, seed: int = 0) -> dict:
        """Every metric of the judge, with a bootstrap 95% interval (`<name>_ci`).

        The bootstrap redraws the samples for every metric but recall, and the training
        digits for recall (the share of them inside the samples' manifold): a redrawn sample
        set repeats points, which would shrink that manifold and bias recall.
        """
        features, probs = self(images)
        per_sample = {
            "inside": metrics.manifold_coverage(self.reference, self.reference_radii, features),
            "broken": probs.argmax(axis=1) == NOT_A_DIGIT,
            "noisy": roughness(images) > NOISY_ROUGHNESS,
            "confidence": probs[:, :NOT_A_DIGIT].max(axis=1)}
        covered = metrics.manifold_coverage(features, metrics.knn_radii(features, K),
                                            self.reference)
        every = np.arange(len(features))
        point = self._set_metrics(features, per_sample, covered, every,
                                  np.arange(len(self.reference)))
        result = {**point, "num_samples": len(features),
                  "label_histogram": np.bincount(probs.argmax(axis=1), minlength=11).tolist()}
        if bootstrap:
            rng = np.random.default_rng(seed)
            draws = [self._set_metrics(features, per_sample, covered,
                                       rng.integers(0, len(features), len(features)),
                                       rng.integers(0, len(covered), len(covered)))
                     for _ in range(bootstrap)]
            for name, value in point.items():
                # The basic bootstrap interval (2θ̂ − q97.5, 2θ̂ − q2.5) corrects the upward
                # bias of a Fréchet distance on redrawn sets (repeats shrink the covariance);
                # for a mean (precision, rates) it is the percentile interval mirrored.
                low, high = np.percentile([d[name] for d in draws], [2.5, 97.5])
                result[f"{name}_ci"] = np.clip([2 * value - high, 2 * value - low],
                                               *_RANGE.get(name, (0.0, 1.0))).tolist()
        return result

    def _set_metrics(self, features: np.ndarray, per_sample: dict, covered: np.ndarray,
                     rows: np.ndarray, reference_rows: np.ndarray) -> dict:
        """The metrics of the samples `rows`; recall over the training digits
        `reference_rows`."""
        f = features[rows]
        mu, sigma = metrics.statistics(f)
        kid, _ = metrics.kid(self.reference, f,
                             num_subsets=min(10, len(f) // 10, len(self.reference) // 10))
        return {"frechet_distance": metrics.frechet_distance(mu, sigma, *self._reference_stats),
                "kid": kid,
                "precision": float(per_sample["inside"][rows].mean()),
                "recall": float(covered[reference_rows].mean()),
                "broken_rate": float(per_sample["broken"][rows].mean()),
                "noisy_rate": float(per_sample["noisy"][rows].mean()),
                "confidence": float(per_sample["confidence"][rows].mean())}

    @functools.cached_property
    def _reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return metrics.statistics(self.reference)

    def worst(self, images: np.ndarray, n: int = 32) -> np.ndarray:
        """Indices of the `n` least realistic images, least realistic first."""
        return np.argsort(self.realism(images), kind="stable")[:n]


def train_judge(seed: int = 0, epochs: int = 30, deterministic: bool = True,
                broken_class: bool = True) -> DigitJudge:
    """Trains the classifier on the training split and fresh broken images each epoch; the
    same network for the same seed. `deterministic` turns on TensorFlow's op determinism for
    the rest of the process (the benchmarks' judge; tests that share a process pass False).
    `broken_class=False` trains a digits-only classifier instead, a second opinion whose
    broken rate is always 0 (`judge_agreement.py`)."""
    import keras
    import tensorflow as tf
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    train_x, train_y = digits_split("train")
    test_x, test_y = digits_split("test")
    network = _build_network(seed, 11 if broken_class else 10)
    logits_only = keras.Model(network.input, network.outputs[1])
    logits_only.compile(optimizer=keras.optimizers.Adam(1e-3),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    broken_y = np.full(len(train_x), NOT_A_DIGIT, train_y.dtype)
    for _ in range(epochs):
        x, y = train_x, train_y
        if broken_class:
            x = np.concatenate([train_x, not_a_digit(train_x, rng)])
            y = np.concatenate([train_y, broken_y])
        order = rng.permutation(len(x))
        logits_only.fit(x[order], y[order], batch_size=64, epochs=1, shuffle=False, verbose=0)
    judge = DigitJudge(network, np.zeros((0, FEATURES)), np.zeros(0), 0.0)
    raw = judge.features(train_x)
    judge.scale = float(np.sqrt(raw.var(axis=0).mean()))
    judge.reference = raw / judge.scale
    judge.reference_radii = metrics.knn_radii(judge.reference, K)
    judge.test_accuracy = float((judge(test_x)[1].argmax(axis=1) == test_y).mean())
    return judge


def unseen_broken(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """Broken images [n, 16, 16, 1] of kinds the judge was not trained on, for calibration:
    `salt_pepper` (each pixel 0 or 1, what the fast samplers were seen to return),
    `stripes` (bars of random width and phase), `saturated` (a digit-sized blob at full
    brightness with noise around it)."""
    rng = np.random.default_rng(seed)
    shape = (n, 16, 16, 1)
    if kind == "salt_pepper":
        return (rng.uniform(size=shape) < rng.uniform(0.2, 0.8, (n, 1, 1, 1))).astype(np.float32)
    if kind == "stripes":
        period = rng.integers(2, 5, (n, 1, 1, 1))
        phase = rng.integers(0, 4, (n, 1, 1, 1))
        columns = np.arange(16)[None, None, :, None]
        return np.broadcast_to(((columns + phase) // period) % 2, shape).astype(np.float32)
    if kind == "saturated":
        yy, xx = np.mgrid[:16, :16]
        centre = rng.uniform(5, 11, (n, 2))
        disc = ((yy[None] - centre[:, :1, None]) ** 2 + (xx[None] - centre[:, 1:, None]) ** 2
                < 16)[..., None]
        return np.clip(np.where(disc, 1.0, rng.uniform(0, 0.6, shape)), 0, 1).astype(np.float32)
    raise ValueError(f"unknown kind {kind!r}; expected salt_pepper, stripes or saturated")


UNSEEN_KINDS = ("salt_pepper", "stripes", "saturated")


def save_worst_grid(judge: DigitJudge, images: np.ndarray, path: str, n: int = 32) -> None:
    """A grid of the `n` least realistic images (least realistic first), enlarged."""
    from ncsn_tf.images import save_image_grid
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image_grid(as_float(images)[judge.worst(images, n)], path, ncol=8)
