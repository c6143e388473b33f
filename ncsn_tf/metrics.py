"""The math of FID and Inception Score on features already computed (NumPy and SciPy).

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to the features of
two image sets; the Inception Score (Salimans et al. 2016) is exp(E_x KL(p(y|x) || p(y))).
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

