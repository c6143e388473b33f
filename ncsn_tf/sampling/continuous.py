"""Base of the samplers that walk their own noise schedule with a continuous-σ score.

Technique 3 makes the score defined at any σ in [σ_L, σ_1]: s(x, σ) = network(x)/σ
(`net.score(x, sigma)`), so these samplers choose their levels freely between the trained
σ_1 = `sigma_max` and σ_L = `sigma_min`. `score_fn(x, sigma)` takes a float σ per example.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from ncsn_tf.sampling.driver import Sampler


class ContinuousSampler(Sampler):
    """A sampler over `schedule` (σ per level, decreasing) with a score at any σ."""

    def __init__(self, score_fn, schedule: np.ndarray, shape: Sequence[int], **options):
        schedule = np.asarray(schedule, np.float32)
        if schedule.ndim != 1 or len(schedule) < 1 or not np.all(np.diff(schedule) < 0):
            raise ValueError(f"the noise schedule must be decreasing, got {schedule}")
        super().__init__(score_fn, tf.constant(schedule), shape, **options)

    def _score(self, x, sigma):
        """s(x, σ) for one σ (scalar tensor) shared by the batch."""
        return tf.cast(self.score_fn(x, tf.fill(tf.shape(x)[:1], sigma)), x.dtype)

    def _next_sigma(self, level):
        """σ of the level after `level`; 0 after the last one."""
        sigmas = self._sigmas()
        following = tf.minimum(level + 1, self.num_levels - 1)
        return tf.where(level + 1 < self.num_levels, sigmas[following], 0.0)


MAX_NUM_STEPS = 100_000  # far beyond any useful schedule; bounds the σ table's memory


def check_num_steps(num_steps: int) -> int:
    if int(num_steps) != num_steps or not 1 <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"num_steps must be an integer in [1, {MAX_NUM_STEPS:,}], got "
                         f"{num_steps}")
    return int(num_steps)
