"""The math of sample-quality metrics on features already computed (NumPy and SciPy).

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to the features of
two image sets; the Inception Score (Salimans et al. 2016) is exp(E_x KL(p(y|x) || p(y))).
Both summarise a whole set, so a few broken samples barely move them. The metrics that see
outliers work on the features themselves: improved precision and recall and the per-sample
realism score (Kynkäänniemi et al., NeurIPS 2019: k-NN balls around each feature vector as an
estimate of each set's manifold), and KID (Bińkowski et al., ICLR 2018: an unbiased MMD² with
a cubic polynomial kernel, with a standard error from disjoint subsets).
Statistics files are `.npz` with keys `mu` and `sigma`, the layout of the published TTUR files
(e.g. `fid_stats_cifar10_train.npz`); files we write also record the feature network's name.
"""
from __future__ import annotations

import io
import os
import uuid
import warnings

import numpy as np
import tensorflow as tf
from scipy import linalg


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [N, D], as float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Expected features of shape [N >= 2, D]; got {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class StatisticsAccumulator:
    """Streams features batch by batch into (mu, sigma), in memory O(D²) instead of O(N·D).

    Sums are taken around the first batch's mean, which keeps the float64 subtraction
    E[xxᵀ] − μμᵀ well conditioned when the mean is large compared to the spread.
    """

    def __init__(self):
        self.count = 0
        self._shift = None
        self._sum = None
        self._outer = None

    def update(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"Expected features of shape [B, D]; got {features.shape}.")
        if not len(features):
            return
        if self._shift is None:
            self._shift = features.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((features.shape[1],) * 2)
        centred = features - self._shift
        self.count += features.shape[0]
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"Need at least 2 feature vectors for a covariance; got {self.count}.")
        mean = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return self._shift + mean, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the Fréchet distance between two Gaussians.

    When Σ1Σ2 is too close to singular for `scipy.linalg.sqrtm` (non-finite result or a square
    root that does not square back to the product), eps·I is added to both covariances.
    Imaginary parts that rounding leaves in the square root are dropped; large ones mean the
    inputs are not covariance matrices and raise.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}. Both sets must come from the same "
                         "feature network (same feature dimension).")
    diff = mu1 - mu2
    covmean = _sqrtm_or_none(sigma1 @ sigma2)
    if covmean is None:
        offset = eps * np.eye(sigma1.shape[0])
        covmean = _sqrtm_or_none((sigma1 + offset) @ (sigma2 + offset))
        if covmean is None:
            raise ValueError("The matrix square root of Σ1·Σ2 is not finite even with an "
                             f"offset of {eps}·I; the covariances are not valid (NaN or "
                             "infinite values?).")
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > 1e-3:
            raise ValueError(f"sqrtm(Σ1·Σ2) has an imaginary component of {largest:.3g}; the "
                             "covariances are not symmetric positive semi-definite.")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm_or_none(product: np.ndarray) -> np.ndarray | None:
    """scipy's matrix square root, or None when it is not finite or does not square back."""
    if not np.isfinite(product).all():
        return None
    with warnings.catch_warnings():  # singular products are handled by the caller
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(product)
    if not np.isfinite(root).all():
        return None
    scale = max(np.linalg.norm(product), np.finfo(np.float64).tiny)
    if np.linalg.norm(root @ root - product) / scale > 1e-6:
        return None
    return root


def inception_score(predictions: np.ndarray, splits: int = 10,
                    from_logits: bool = True) -> tuple[float, float]:
    """Mean and standard deviation over `splits` of exp(E_x KL(p(y|x) || p(y))).

    `predictions` [N, K] are logits (softmax taken here, in a numerically stable way) or, with
    from_logits=False, probabilities. Each split uses its own marginal p(y), as in the
    original implementation (splits=10 for published numbers; splits=1 is TF-GAN's estimate).
    """
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.ndim != 2:
        raise ValueError("Expected predictions of shape [N, num_classes]; got "
                         f"{predictions.shape}.")
    n = predictions.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, {n}] for {n} predictions; got {splits}.")
    if from_logits:
        shifted = predictions - predictions.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
    else:
        p = predictions
        if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("Probabilities must be non-negative and sum to 1 per row; pass "
                             "from_logits=True for logits.")
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        part, log_part = p[rows], log_p[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_marginal = np.log(part.mean(axis=0))
            # 0·log 0 = 0: classes a row gives no mass contribute nothing to its KL.
            kl = np.where(part > 0, part * (log_part - log_marginal), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, *, network: str,
                    num_images: int) -> None:
    """Writes `mu`, `sigma` (TTUR layout) plus `network` and `num_images`, atomically.

    Works with any `tf.io.gfile` path (local, gs://...).
    """
    buffer = io.BytesIO()
    np.savez(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             network=np.array(network), num_images=np.array(num_images))
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def load_statistics(path: str, network: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an `.npz` with `mu`/`sigma` (TTUR and ours) or raw `pool_3` features.

    When `network` is given and the file records the network that made it, the two must
    match: FIDs against statistics of another network are meaningless.
    """
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"No statistics file at {path}.")
    with tf.io.gfile.GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if network is not None and "network" in data.files and str(data["network"]) != network:
        raise ValueError(f"{path} holds statistics of {str(data['network'])!r}, not of "
                         f"{network!r}. Use statistics computed with the same feature network "
                         "(delete the file or pass another path to recompute them).")
    if "mu" in data.files and "sigma" in data.files:
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if "pool_3" in data.files:  # score_sde's layout: the features themselves
        return statistics(data["pool_3"])
    raise ValueError(f"{path} has keys {data.files}; expected 'mu' and 'sigma' (TTUR layout) "
                     "or 'pool_3' (raw features).")



# ------------------------------------------------------------------ outlier-aware metrics

def pairwise_distances(a: np.ndarray, b: np.ndarray, block: int = 2048) -> np.ndarray:
    """Euclidean distances [len(a), len(b)] between feature vectors, in row blocks (float32
    products, float64 norms; memory O(block·len(b)) beyond the result)."""
    a, b = _features_2d(a, "a"), _features_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Feature dimensions differ: {a.shape[1]} vs {b.shape[1]}; both sets "
                         "must come from the same feature network.")
    b_sq = np.einsum("ij,ij->i", b, b)
    b32 = b.astype(np.float32)
    out = np.empty((len(a), len(b)), np.float64)
    for start in range(0, len(a), block):
        rows = a[start:start + block]
        sq = (np.einsum("ij,ij->i", rows, rows)[:, None] + b_sq[None, :]
              - 2.0 * (rows.astype(np.float32) @ b32.T))
        out[start:start + block] = np.sqrt(np.maximum(sq, 0.0))
    return out


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance from each feature vector to its k-th nearest other vector of the same set."""
    features = _features_2d(features, "features")
    if not 1 <= k < len(features):
        raise ValueError(f"k must be in [1, {len(features) - 1}] for {len(features)} feature "
                         f"vectors; got {k}.")
    radii = np.empty(len(features))
    for start in range(0, len(features), 2048):
        d = pairwise_distances(features[start:start + 2048], features)
        radii[start:start + 2048] = np.partition(d, k, axis=1)[:, k]  # column 0 is itself
    return radii


def manifold_coverage(reference: np.ndarray, radii: np.ndarray, queries: np.ndarray
                      ) -> np.ndarray:
    """For each query, whether it lies in some ball B(reference_i, radii_i): the k-NN estimate
    of the reference set's manifold."""
    queries = _features_2d(queries, "queries")
    inside = np.zeros(len(queries), bool)
    for start in range(0, len(queries), 2048):
        d = pairwise_distances(queries[start:start + 2048], reference)
        inside[start:start + 2048] = (d <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision (the share of `fake` inside the manifold of `real`) and recall (the
    share of `real` inside the manifold of `fake`), each manifold the union of k-NN balls.

    A broken sample lands outside every ball of the real set, so mixing a fraction f of them
    into a sample set lowers precision by f × the precision of the rest.
    """
    precision = manifold_coverage(real, knn_radii(real, k), fake).mean()
    recall = manifold_coverage(fake, knn_radii(fake, k), real).mean()
    return float(precision), float(recall)


def realism_scores(real: np.ndarray, fake: np.ndarray, k: int = 3,
                   real_radii: np.ndarray | None = None) -> np.ndarray:
    """Per-sample realism max_i r_i / ‖fake − real_i‖ over the real vectors whose k-NN radius
    r_i is at most the median (the pruning of Kynkäänniemi et al., which keeps outliers of the
    real set from vouching for anything). Above 1: inside the real manifold; the lower, the
    farther outside. Pass `real_radii` (from `knn_radii(real, k)`) to reuse them across
    batches."""
    real = _features_2d(real, "real")
    radii = knn_radii(real, k) if real_radii is None else np.asarray(real_radii, np.float64)
    keep = radii <= np.median(radii)
    d = pairwise_distances(fake, real[keep])
    with np.errstate(divide="ignore"):
        return (radii[keep][None, :] / d).max(axis=1)


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = 10) -> tuple[float, float]:
    """Kernel Inception Distance: (unbiased MMD² with k(x, y) = (x·y/d + 1)³, its standard
    error).

    Both sets are cut into `num_subsets` disjoint subsets of equal size m (the extra vectors
    are dropped); each pair of subsets gives an unbiased estimate, so their mean is unbiased
    at any sample size (unlike FID) and their spread / √num_subsets is an honest standard
    error: the subsets share no vector.
    """
    real, fake = _features_2d(real, "real"), _features_2d(fake, "fake")
    m = min(len(real), len(fake)) // num_subsets
    if num_subsets < 2 or m < 2:
        raise ValueError(f"KID needs num_subsets >= 2 subsets of >= 2 vectors; got {len(real)} "
                         f"and {len(fake)} vectors for {num_subsets} subsets.")
    d = real.shape[1]
    estimates = []
    for i in range(num_subsets):
        x, y = real[i * m:(i + 1) * m], fake[i * m:(i + 1) * m]
        k_xx, k_yy, k_xy = ((p @ q.T / d + 1.0) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = m * (m - 1)
        estimates.append((k_xx.sum() - np.trace(k_xx)) / off
                         + (k_yy.sum() - np.trace(k_yy)) / off - 2.0 * k_xy.mean())
    estimates = np.array(estimates)
    return float(estimates.mean()), float(estimates.std(ddof=1) / np.sqrt(num_subsets))


def _features_2d(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or not len(features):
        raise ValueError(f"Expected {name} of shape [N >= 1, D]; got {features.shape}.")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} holds NaN or infinite values: the images were broken (NaN "
                         "pixels?) or the feature network diverged.")
    return features
