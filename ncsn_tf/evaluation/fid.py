"""FID, Inception Score and the outlier-aware metrics: features of image batches streamed
through a `FeatureNetwork`, dataset reference statistics (cached) and reference features, and
the scores of a set of samples."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import tensorflow as tf
from absl import logging

from ncsn_tf import data
from ncsn_tf.evaluation import metrics
from ncsn_tf.config import presets
from ncsn_tf.evaluation.sources import batches_of, images_of
from ncsn_tf.evaluation.inception import FeatureNetwork
from ncsn_tf.progress import Progress, duration

Statistics = tuple[np.ndarray, np.ndarray]


def _features(source: Any, feature_net: FeatureNetwork, *, batch_size: int,
              max_images: int | None, what: str
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(images, features, logits) per batch of `source`, stopping after `max_images` images."""
    batches = batches_of(source, batch_size)
    if (isinstance(batches, tf.data.Dataset) and max_images is None
            and batches.cardinality() == tf.data.INFINITE_CARDINALITY):
        raise ValueError(f"{what}: the dataset repeats forever; pass max_images.")
    progress = Progress()
    what = f"{what} through {feature_net.name}"
    for batch in batches:
        images = images_of(batch)
        if max_images is not None:
            images = images[:max_images - int(progress.done)]
        if len(images):
            yield (images, *feature_net(images))
            progress.advance(len(images))
            log_progress(what, progress)
        if max_images is not None and progress.done >= max_images:
            break
    log_progress(what, progress, final=True)


def dataset_statistics(source: Any, feature_net: FeatureNetwork, *, batch_size: int = 250,
                       max_images: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, number of images) of the features of all images in `source`, streamed."""
    accumulator = metrics.StatisticsAccumulator()
    for _, features, _ in _features(source, feature_net, batch_size=batch_size,
                                    max_images=max_images, what="statistics"):
        accumulator.update(features)
    mu, sigma = accumulator.result()
    return mu, sigma, accumulator.count


def reference_statistics(config: presets.Config, feature_net: FeatureNetwork,
                         cache_path: str | None, *, split: str = "train", batch_size: int = 250,
                         max_images: int | None = None) -> Statistics:
    """(mu, sigma) of the dataset of `config`, loaded from `cache_path` or computed and saved.

    The cache is trusted as is (delete it to recompute, e.g. after changing `max_images`), but
    a cache written for another feature network is refused.
    """
    if cache_path and tf.io.gfile.exists(cache_path):
        logging.info("Reference statistics from %s", cache_path)
        return metrics.load_statistics(cache_path, network=feature_net.name)
    batches = data.load(config, split, training=False, batch_size=batch_size)
    mu, sigma, count = dataset_statistics(batches, feature_net, batch_size=batch_size,
                                          max_images=max_images)
    if cache_path:
        metrics.save_statistics(cache_path, mu, sigma, network=feature_net.name, num_images=count)
        logging.info("Saved reference statistics of %d %s/%s images to %s", count,
                     config.data.dataset, split, cache_path)
    return mu, sigma


def reference_features(config: presets.Config, feature_net: FeatureNetwork, *,
                       split: str = "train", batch_size: int = 250,
                       max_images: int = 10_000) -> np.ndarray:
    """Features of the first `max_images` images of the dataset of `config` (the reference
    set of precision, recall and KID)."""
    batches = data.load(config, split, training=False, batch_size=batch_size)
    return np.concatenate([features for _, features, _ in _features(
        batches, feature_net, batch_size=batch_size, max_images=max_images,
        what="reference features")])


class ManifoldMetrics:
    """Improved precision and recall, KID and per-sample realism of streamed samples against
    reference features (see `ncsn_tf.evaluation.metrics`), keeping the `num_worst` least realistic
    images so that a person can look at the failures.

    Realism is computed for every sample; precision, recall and KID use the first
    `max_samples` samples' features (memory and the k-NN search stay bounded).
    """

    def __init__(self, reference: np.ndarray, *, k: int = 3, max_samples: int = 10_000,
                 num_worst: int = 32):
        self.reference = np.asarray(reference, np.float64)
        self.k, self.max_samples, self.num_worst = k, max_samples, num_worst
        self.radii = metrics.knn_radii(self.reference, k)
        self.count = 0
        self._features: list[np.ndarray] = []
        self._kept = 0
        self._worst: list[tuple[float, int, np.ndarray]] = []  # (realism, index, image)

    def update(self, images: np.ndarray, features: np.ndarray) -> None:
        features = np.asarray(features, np.float64)
        take = features[:max(self.max_samples - self._kept, 0)]
        if len(take):
            self._features.append(take)
            self._kept += len(take)
        realism = metrics.realism_scores(self.reference, features, self.k, self.radii)
        order = np.argsort(realism, kind="stable")[:self.num_worst]
        self._worst += [(float(realism[i]), self.count + int(i), np.asarray(images[i]))
                        for i in order]
        self._worst = sorted(self._worst, key=lambda w: (w[0], w[1]))[:self.num_worst]
        self.count += len(features)

    def result(self) -> dict[str, Any]:
        """precision, recall, kid, kid_se (None where the samples are too few), k, and the
        realism and index of the least realistic samples, least realistic first."""
        out: dict[str, Any] = {"precision": None, "recall": None, "kid": None, "kid_se": None,
                               "pr_k": self.k, "pr_num_images": self._kept}
        if self._kept > self.k:
            fake = np.concatenate(self._features)
            out["precision"], out["recall"] = metrics.precision_recall(self.reference, fake,
                                                                       self.k)
            subsets = min(10, min(len(fake), len(self.reference)) // 2)
            if subsets >= 2:
                out["kid"], out["kid_se"] = metrics.kid(self.reference, fake, subsets)
        out["least_realistic"] = {"realism": [w[0] for w in self._worst],
                                  "index": [w[1] for w in self._worst]}
        return out

    def worst_images(self) -> np.ndarray:
        """The least realistic images seen, least realistic first."""
        return np.stack([w[2] for w in self._worst])


def compute_fid_is(samples: Any, feature_net: FeatureNetwork, ref_stats: Statistics | str, *,
                   batch_size: int = 250, max_images: int | None = None,
                   splits: int = 10, manifold: ManifoldMetrics | None = None
                   ) -> dict[str, Any]:
    """FID against `ref_stats` ((mu, sigma) or an `.npz` path) and Inception Score of samples,
    and with `manifold` its precision, recall, KID and least realistic samples.

    `samples`: anything `batches_of` takes, e.g. an `.npz` path, a folder, an array, a
    Dataset or a generator of batches (uint8, or float in [0, 1]). The Inception Score is
    None when the network has no classifier head.
    """
    reference = None
    if isinstance(ref_stats, str):
        reference = ref_stats
        ref_stats = metrics.load_statistics(ref_stats, network=feature_net.name)
    accumulator, all_logits = metrics.StatisticsAccumulator(), []
    for images, features, logits in _features(samples, feature_net, batch_size=batch_size,
                                              max_images=max_images, what="samples"):
        accumulator.update(features)
        if manifold is not None:
            manifold.update(images, features)
        if logits is not None:
            all_logits.append(logits)
    mu, sigma = accumulator.result()
    if accumulator.count < mu.shape[0]:
        logging.warning("FID from %d images with %d features is biased upwards (rank-deficient "
                        "covariance); published FIDs use 50,000 samples.",
                        accumulator.count, mu.shape[0])
    result: dict[str, Any] = {
        "fid": metrics.frechet_distance(mu, sigma, *ref_stats),
        "inception_score": None,
        "inception_score_std": None,
        "num_images": accumulator.count,
        "splits": splits,
        "network": feature_net.name,
    }
    if reference is not None:
        result["reference"] = reference
    if all_logits:
        result["inception_score"], result["inception_score_std"] = metrics.inception_score(
            np.concatenate(all_logits), splits=splits)
    if manifold is not None:
        result.update(manifold.result())
    return result


def log_progress(what: str, progress: Progress, final: bool = False) -> None:
    """Logs images done, images/s and (given a total) the time left, when a report is due."""
    if not progress.due(final):
        return
    if progress.total is None:
        logging.info("%s: %d images, %.1f images/s", what, progress.done, progress.rate)
    else:
        logging.info("%s: %d/%d images, %.1f images/s, ETA %s", what, progress.done,
                     progress.total, progress.rate, duration(progress.eta))
