"""An independent judge of digit samples: a small classifier trained on the digits training split.

Sample quality on the offline `digits` preset is scored in the feature space of this network,
not of anything ncsn_tf trains: a scikit-learn multilayer perceptron (two ReLU layers, Adam,
fixed `random_state`, so the same network every run) on the 1,600 training images at the
preset's 16 px, exactly as `ncsn_tf.data` builds them. Its penultimate layer gives the features
of a Fréchet distance (as FID does with Inception's pool layer), its softmax the confidence and
the predicted-label histogram.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

from ncsn_tf import data, metrics, presets

HIDDEN = (128, 64)


def digits_split(split: str, image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, H, W, 1] in [0, 1], labels [N]) of the digits `split` as ncsn_tf
    trains on them."""
    config = presets.get("digits")
    config.data.image_size = image_size
    images = np.concatenate([b.numpy() for b in data.load(config, split, training=False,
                                                         batch_size=512)])
    targets = load_digits().target
    held_out = data.DIGITS_TEST_SIZE
    labels = targets[:len(targets) - held_out] if split == "train" else targets[-held_out:]
    return images, labels


def _flat(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] uint8 or float in [0, 1] → float64 [N, H·W·C] in [0, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images / 255.0
    return np.clip(images.reshape(len(images), -1).astype(np.float64), 0.0, 1.0)


@dataclasses.dataclass
class DigitJudge:
    """The trained classifier and the statistics of the training images in its features."""
    classifier: MLPClassifier
    reference_mu: np.ndarray
    reference_sigma: np.ndarray
    test_accuracy: float

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer activations [N, HIDDEN[-1]]."""
        h = _flat(images)
        for w, b in zip(self.classifier.coefs_[:-1], self.classifier.intercepts_[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return h

    def score(self, images: np.ndarray) -> dict:
        """Fréchet distance to the training images, mean top-class confidence, label counts."""
        mu, sigma = metrics.statistics(self.features(images))
        probs = self.classifier.predict_proba(_flat(images))
        return {"frechet_distance": float(metrics.frechet_distance(
                    mu, sigma, self.reference_mu, self.reference_sigma)),
                "confidence": float(probs.max(axis=1).mean()),
                "label_histogram": np.bincount(probs.argmax(axis=1), minlength=10).tolist()}


def train_judge(seed: int = 0) -> DigitJudge:
    """Trains the classifier on the training split (deterministic for a given seed)."""
    train_x, train_y = digits_split("train")
    test_x, test_y = digits_split("test")
    classifier = MLPClassifier(HIDDEN, alpha=1e-3, max_iter=400, random_state=seed)
    classifier.fit(_flat(train_x), train_y)
    judge = DigitJudge(classifier, np.zeros(0), np.zeros((0, 0)),
                       float(classifier.score(_flat(test_x), test_y)))
    judge.reference_mu, judge.reference_sigma = metrics.statistics(judge.features(train_x))
    return judge
