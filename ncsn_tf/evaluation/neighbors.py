"""Nearest training images of samples (the official memorisation check) and their grid."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ncsn_tf.evaluation.sources import batches_of, images_of, to_nhwc
from ncsn_tf.png import MIN_TILE, upscale_factor
from ncsn_tf.evaluation.inception import FeatureNetwork


@dataclasses.dataclass
class Neighbors:
    """The k nearest training images of each sample, nearest first."""
    indices: np.ndarray  # [S, k] positions in the streamed training set
    distances: np.ndarray  # [S, k] L2 distances (pixels in [0, 1], or features)
    images: np.ndarray  # [S, k, H, W, C] float32 in [0, 1]
    space: str  # "pixels" or the feature network's name


def nearest_neighbors(samples: np.ndarray, train: Any, k: int = 9, *,
                      feature_net: FeatureNetwork | None = None, flip: bool = True,
                      batch_size: int = 500) -> Neighbors:
    """For each sample, the k nearest training images by L2 (a memorisation check).

    Distances are between pixels in [0, 1], or between `feature_net` features when given.
    The training set (`train`: anything `batches_of` takes) is streamed once; each block of
    distances is one matrix product, ‖a‖² + ‖b‖² − 2a·b. With `flip`, a training image's
    distance is the smaller of those to the sample and to its mirror image, as the official
    evaluation does.
    """
    samples = _as_float(to_nhwc(samples))
    queries = [samples, samples[:, :, ::-1]] if flip else [samples]

    def embed(images):
        if feature_net is None:
            return images.reshape(len(images), -1).astype(np.float64)
        return feature_net(images)[0].astype(np.float64)

    queries = [embed(q) for q in queries]
    query_norms = [np.sum(q * q, axis=1) for q in queries]
    num = len(samples)
    best_d2 = np.full((num, k), np.inf)
    best_index = np.full((num, k), -1, dtype=np.int64)
    best_images = np.zeros((num, k) + samples.shape[1:], np.float32)
    seen = 0
    for batch in batches_of(train, batch_size):
        images = _as_float(images_of(batch))
        if images.shape[1:] != samples.shape[1:]:
            raise ValueError(f"Training images have shape {images.shape[1:]} but samples "
                             f"{samples.shape[1:]}; they must match.")
        keys = embed(images)
        key_norms = np.sum(keys * keys, axis=1)
        d2 = np.min([qn[:, None] + key_norms[None, :] - 2.0 * q @ keys.T
                     for q, qn in zip(queries, query_norms)], axis=0)
        merged_d2 = np.concatenate([best_d2, d2], axis=1)
        order = np.argsort(merged_d2, axis=1, kind="stable")[:, :k]
        is_new = order >= k
        new_pos = np.where(is_new, order - k, 0)
        kept = np.where(is_new, 0, order)
        best_images = np.take_along_axis(best_images, kept[..., None, None, None], axis=1)
        best_images[is_new] = images[new_pos[is_new]]
        best_index = np.where(is_new, seen + new_pos, np.take_along_axis(best_index, kept, 1))
        best_d2 = np.take_along_axis(merged_d2, order, axis=1)
        seen += len(images)
    if seen < k:
        raise ValueError(f"Need at least k={k} training images; got {seen}.")
    return Neighbors(best_index, np.sqrt(np.maximum(best_d2, 0.0)), best_images,
                     "pixels" if feature_net is None else feature_net.name)


def _as_float(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def neighbor_grid(samples: np.ndarray, neighbor_images: np.ndarray, padding: int = 2,
                  min_tile: int = MIN_TILE) -> np.ndarray:
    """uint8 image: one row per sample, the sample then its neighbours (after a wider gap),
    each enlarged by nearest neighbour to at least `min_tile` pixels tall (0: never), as the
    sample grids are."""
    samples = _as_float(to_nhwc(samples))
    rows = np.concatenate([samples[:, None], neighbor_images], axis=1)  # [S, k+1, H, W, C]
    if min_tile:
        factor = upscale_factor(rows.shape[2], min_tile)
        rows = rows.repeat(factor, axis=2).repeat(factor, axis=3)
    num_rows, num_cols, h, w, c = rows.shape
    gap = 3 * padding  # between a sample and its neighbours
    grid = np.ones((padding + num_rows * (h + padding),
                    padding + gap + num_cols * (w + padding) - padding, c), np.float32)
    for i in range(num_rows):
        for j in range(num_cols):
            top = padding + i * (h + padding)
            left = padding + j * (w + padding) + (gap - padding if j else 0)
            grid[top:top + h, left:left + w] = rows[i, j]
    return np.round(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8)
