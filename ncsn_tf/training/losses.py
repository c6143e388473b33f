"""The annealed denoising score matching loss of NCSNv2 (paper Eq. 2 with λ(σ) = σ^anneal_power).

The random draws (noise level indices and Gaussian noise) are arguments, not made here, so
that the caller decides how they are seeded (see `score_model.draw_perturbation`).
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

ScoreFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def dsm_loss(score_fn: ScoreFn, x: tf.Tensor, sigmas: tf.Tensor, labels: tf.Tensor,
             noise: tf.Tensor, anneal_power: float = 2.0) -> tf.Tensor:
    """Per-example annealed DSM loss, float32 of shape [B].

    For example b with level i = labels[b] and noise z = noise[b]: x̃ = x + σ_i z, the target
    score is −z/σ_i, and the loss is ½‖score_fn(x̃, i) − target‖² summed over all dimensions,
    times σ_i^anneal_power. Average it over the batch for the paper's objective.

    Args:
      score_fn: called as `score_fn(x̃, labels)`; returns the score, same shape as `x`
        (a score network called with its training flag bound, e.g. `lambda y, i: net(y, i,
        training=True)`).
      x: clean data, float, [B, ...].
      sigmas: the σ table, float [L].
      labels: level indices into `sigmas`, int [B].
      noise: z ~ N(0, I), same shape as `x`.
      anneal_power: the exponent of the σ weighting (2 in every official config).
    """
    x = tf.cast(x, tf.float32)
    noise = tf.cast(noise, tf.float32)
    labels = tf.convert_to_tensor(labels)
    used_sigmas = tf.gather(tf.cast(sigmas, tf.float32), labels)
    expand = tf.reshape(used_sigmas, [-1] + [1] * (x.shape.rank - 1))
    perturbed = x + expand * noise
    target = -noise / expand
    score = tf.cast(score_fn(perturbed, labels), tf.float32)
    squared_error = tf.reduce_sum(tf.square(score - target), axis=list(range(1, x.shape.rank)))
    return 0.5 * squared_error * used_sigmas ** anneal_power
