"""StatisticsGen's work: what NCSNv2 needs to know about the training images.

Count, shape, D = H·W·C, mean image (also saved as a PNG), per-channel mean and standard
deviation, and the paper's noise-scale techniques: σ1 ≈ the largest distance between two
training images (Technique 1, over a random subsample above `noise.SUBSAMPLE_SIZE` examples,
as `python -m ncsn_tf.configure` does), then L (Technique 2) and ε (Technique 4) for the
preset's σL and T. Written as `statistics.json` + `mean_image.png` in the output directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import tensorflow as tf

from ncsn_tf import data, noise
from ncsn_tf.png import upscale_factor
from pipelines import example_gen

STATISTICS_FILE = "statistics.json"
MEAN_IMAGE_FILE = "mean_image.png"


def compute(examples_dir: str, out_dir: str) -> dict[str, Any]:
    """Statistics of the train split of `examples_dir`, written to `out_dir` and returned."""
    config = example_gen.read_config(examples_dir)
    images = data.load(config, "train", training=False)
    count, total, total_sq = 0, 0.0, 0.0
    for batch in images.batch(256).as_numpy_iterator():
        batch = batch.astype(np.float64)
        count += len(batch)
        total = total + batch.sum(axis=0)
        total_sq = total_sq + np.square(batch).sum(axis=(0, 1, 2))
    if count < 2:
        raise ValueError(f"The train split of {examples_dir} has {count} image(s); the "
                         "statistics need at least 2.")
    mean_image = total / count
    pixels = count * mean_image.shape[0] * mean_image.shape[1]
    channel_mean = total.sum(axis=(0, 1)) / pixels
    channel_std = np.sqrt(np.maximum(total_sq / pixels - channel_mean**2, 0.0))

    distance = noise.max_pairwise_distance(images)
    proposal = noise.recommend(distance.dim, distance.distance, config.model.sigma_end,
                               config.sampling.n_steps_each)
    stats = {
        "num_examples": count,
        "shape": list(mean_image.shape),
        "dim": distance.dim,
        "channel_mean": channel_mean.tolist(),
        "channel_std": channel_std.tolist(),
        "sigma_begin": distance.distance,
        "sigma_begin_method": f"max pairwise distance, {distance.method}",
        "sigma_begin_exact": distance.exact,
        "proposal": dataclasses.asdict(proposal),
    }
    tf.io.gfile.makedirs(out_dir)
    with tf.io.gfile.GFile(os.path.join(out_dir, STATISTICS_FILE), "w") as f:
        json.dump(stats, f, indent=2)
    factor = upscale_factor(mean_image.shape[0])  # shown as large as the sample grids
    enlarged = mean_image.repeat(factor, axis=0).repeat(factor, axis=1)
    encoded = tf.io.encode_png(np.round(np.clip(enlarged, 0.0, 1.0) * 255.0).astype(np.uint8))
    with tf.io.gfile.GFile(os.path.join(out_dir, MEAN_IMAGE_FILE), "wb") as f:
        f.write(encoded.numpy())
    return stats


def read(statistics_dir: str) -> dict[str, Any]:
    """The statistics `compute` wrote to `statistics_dir`."""
    with tf.io.gfile.GFile(os.path.join(statistics_dir, STATISTICS_FILE)) as f:
        return json.load(f)


def report(stats: dict[str, Any]) -> str:
    """A few lines for the run log."""
    p = stats["proposal"]
    shape = "x".join(str(d) for d in stats["shape"])
    return "\n".join([
        f"examples: {stats['num_examples']:,} of shape {shape} (D = {stats['dim']:,})",
        "channel mean: " + ", ".join(f"{v:.4f}" for v in stats["channel_mean"])
        + "; std: " + ", ".join(f"{v:.4f}" for v in stats["channel_std"]),
        f"sigma_begin (Technique 1): {stats['sigma_begin']:.6g} ({stats['sigma_begin_method']})",
        f"num_scales (Technique 2): {p['num_scales']} (gamma {p['gamma']:.6g}, sigma_end "
        f"{p['sigma_end']:g})",
        f"step_lr (Technique 4): {p['step_lr']:.3g} for n_steps_each {p['n_steps_each']} "
        f"(variance ratio {p['variance_ratio']:.4f}, ideal 1)",
    ])
