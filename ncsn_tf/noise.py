"""Noise scales σ1 > … > σL and the paper's Techniques 1, 2 and 4 for choosing them.

Technique 1: σ1 ≈ the largest Euclidean distance between two training examples
(`max_pairwise_distance`, streamed over a tf.data pipeline).
Technique 2: a geometric table whose ratio γ = σ(i−1)/σi satisfies
Φ(√(2D)(γ−1) + 3γ) − Φ(√(2D)(γ−1) − 3γ) = 0.5 (`gamma_for_dimension`, `num_scales_for`).
Technique 4: given T Langevin steps per level, the step size ε that brings the variance ratio of
Eq. 6 closest to 1 (`variance_ratio`, `best_step_lr`).
`recommend` chains 2 and 4 for a given D and σ1.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np
import tensorflow as tf
from absl import logging
from scipy import optimize, special

from ncsn_tf import progress

SIGMA_DISTS = ("geometric", "uniform")
# Technique 1 compares every pair of at most this many examples unless `exact=True`...
SUBSAMPLE_SIZE = 20_000
# ...and fewer for large images, so that the random subsample held in memory stays under 2 GiB.
SUBSAMPLE_BYTES = 2 * 2**30


def get_sigmas(sigma_begin: float, sigma_end: float, num_scales: int,
               dist: str = "geometric") -> np.ndarray:
    """The noise levels σ1 > … > σL as float32 [L], as the official code builds them.

    "geometric": exp(linspace(log σ1, log σL, L)) (constant ratio γ, the paper's choice);
    "uniform": linspace(σ1, σL, L).
    """
    num_scales = _positive_int(num_scales, "num_scales")
    if num_scales < 2:
        raise ValueError(f"num_scales must be at least 2, got {num_scales}")
    _check_sigma_range(sigma_begin, sigma_end)
    if dist == "geometric":
        sigmas = np.exp(np.linspace(np.log(sigma_begin), np.log(sigma_end), num_scales))
    elif dist == "uniform":
        sigmas = np.linspace(sigma_begin, sigma_end, num_scales)
    else:
        raise ValueError(f"Unknown sigma_dist {dist!r}; expected one of {SIGMA_DISTS}")
    return sigmas.astype(np.float32)


def geometric_ratio(sigma_begin: float, sigma_end: float, num_scales: int) -> float:
    """γ = σ(i−1)/σi of the geometric table with `num_scales` levels from σ1 to σL."""
    num_scales = _positive_int(num_scales, "num_scales")
    if num_scales < 2:
        raise ValueError(f"num_scales must be at least 2, got {num_scales}")
    _check_sigma_range(sigma_begin, sigma_end)
    return float((sigma_begin / sigma_end) ** (1.0 / (num_scales - 1)))


# --- Technique 2 -------------------------------------------------------------------------------

def gamma_for_dimension(dim: int) -> float:
    """Technique 2: the ratio γ > 1 with Φ(√(2D)(γ−1) + 3γ) − Φ(√(2D)(γ−1) − 3γ) = 0.5.

    Needs D ≥ 5: below that (√(2D) < 3) the left side never falls to 0.5.
    """
    dim = _positive_int(dim, "dim")
    if 2 * dim <= 9:
        raise ValueError(f"Technique 2 needs a data dimension D >= 5 (D = H*W*C), got {dim}")
    root_2d = math.sqrt(2.0 * dim)

    def excess(gamma: float) -> float:
        shift = root_2d * (gamma - 1.0)
        return special.ndtr(shift + 3.0 * gamma) - special.ndtr(shift - 3.0 * gamma) - 0.5

    # At γ = 1 the left side is Φ(3) − Φ(−3) ≈ 0.997; widen the bracket until it drops below 0.5.
    upper = 1.0 + 1.0 / root_2d
    while excess(upper) > 0.0:
        upper = 1.0 + 2.0 * (upper - 1.0)
    return float(optimize.brentq(excess, 1.0, upper, xtol=1e-14, rtol=1e-14))


def num_scales_for(sigma_begin: float, sigma_end: float, gamma: float) -> int:
    """Technique 2: L = 1 + log(σ1/σL)/log γ, rounded up (so the table's ratio is at most γ)."""
    _check_sigma_range(sigma_begin, sigma_end)
    if not gamma > 1.0:
        raise ValueError(f"gamma must be > 1 (the ratio of consecutive noise levels), got {gamma}")
    exact = 1.0 + math.log(sigma_begin / sigma_end) / math.log(gamma)
    # Guard against a float result such as 219.00000000000003 adding a level.
    return max(2, math.ceil(exact - 1e-9))


# --- Technique 4 -------------------------------------------------------------------------------

def variance_ratio(step_lr: float, n_steps_each: int, gamma: float, sigma_end: float) -> float:
    """Eq. 6: Var(x_T)/σL² after T Langevin steps at σL, started from N(0, σ(L−1)²I) = N(0, γ²σL²I).

    With x = ε/σL² the paper's expression
        (1 − x)^(2T) · (γ² − 2ε/(σL² − σL²(1 − x)²)) + 2ε/(σL² − σL²(1 − x)²)
    simplifies to (1 − x)^(2T) · γ² + (1 − (1 − x)^(2T)) · 2/(2 − x), the form computed here
    (no cancellation for small ε). It blends the start γ² and the chain's stationary
    2/(2 − x), both above 1, so for γ > 1 it exceeds 1 for every ε: Technique 4 minimises it.
    """
    n_steps_each = _positive_int(n_steps_each, "n_steps_each")
    if not gamma > 1.0:
        raise ValueError(f"gamma must be > 1, got {gamma}")
    if not sigma_end > 0.0:
        raise ValueError(f"sigma_end must be > 0, got {sigma_end}")
    x = step_lr / sigma_end**2
    if not 0.0 < x < 2.0:
        raise ValueError(f"step_lr must be in (0, 2*sigma_end**2) = (0, {2 * sigma_end**2:g}) "
                         f"for Langevin dynamics at sigma_end={sigma_end:g} to be stable, got "
                         f"{step_lr}")
    return float(_variance_ratio(x, n_steps_each, gamma))


def _variance_ratio(x, n_steps_each: int, gamma: float):
    decay = (1.0 - x) ** (2 * n_steps_each)
    return decay * gamma**2 + (1.0 - decay) * 2.0 / (2.0 - x)


def best_step_lr(n_steps_each: int, gamma: float, sigma_end: float) -> float:
    """Technique 4: the ε in (0, σL²] whose variance ratio (Eq. 6) is closest to 1.

    For γ > 1 the ratio stays above 1 (see `variance_ratio`) and only approaches it, so this is
    where the ratio is smallest. A log-spaced grid over ε/σL² ∈ [1e-12, 1] finds the best
    region and a bounded scalar search refines |ratio − 1| there, which finds the global best
    even where the curve is flat or not unimodal. ε scales with σL²: ε = σL² · x*(T, γ).
    """
    n_steps_each = _positive_int(n_steps_each, "n_steps_each")
    if not gamma > 1.0:
        raise ValueError(f"gamma must be > 1, got {gamma}")
    if not sigma_end > 0.0:
        raise ValueError(f"sigma_end must be > 0, got {sigma_end}")

    def distance_to_one(log_x):
        return np.abs(_variance_ratio(np.exp(log_x), n_steps_each, gamma) - 1.0)

    grid = np.linspace(math.log(1e-12), 0.0, 4001)
    i = int(np.argmin(distance_to_one(grid)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    refined = optimize.minimize_scalar(distance_to_one, bounds=(lo, hi), method="bounded",
                                       options={"xatol": 1e-12})
    log_x = refined.x if refined.fun <= distance_to_one(grid[i]) else grid[i]
    return float(math.exp(log_x) * sigma_end**2)


# --- Techniques 2 and 4 together ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Recommendation:
    """Noise scales and sampling step size for data of dimension D, from Techniques 2 and 4."""
    dim: int
    sigma_begin: float  # σ1 (Technique 1, given)
    sigma_end: float  # σL
    gamma: float  # Technique 2's ratio for D
    num_scales: int  # L: Technique 2's (rounded up), or the one asked for
    sigma_ratio: float  # σ(i−1)/σi of the L-level geometric table; Technique 4 uses it
    n_steps_each: int  # T
    step_lr: float  # ε (Technique 4)
    variance_ratio: float  # Eq. 6 at step_lr; the closer to 1 the better
    technique2_num_scales: int  # Technique 2's L (equal to num_scales unless L was given)

    def overrides(self) -> dict[str, float | int]:
        """The config fields this sets, for `presets.override(config, **rec.overrides())`."""
        return dict(sigma_begin=self.sigma_begin, sigma_end=self.sigma_end,
                    num_scales=self.num_scales, n_steps_each=self.n_steps_each,
                    step_lr=self.step_lr)


def recommend(dim: int, sigma_begin: float, sigma_end: float = 0.01,
              n_steps_each: int = 5, num_scales: int | None = None) -> Recommendation:
    """γ and L for D (Technique 2), then ε for T steps per level (Technique 4).

    `num_scales` fixes L instead (e.g. the official CIFAR-10 config's 232, where Technique 2
    gives 220); ε is then chosen for that table's ratio.
    """
    gamma = gamma_for_dimension(dim)
    technique2 = num_scales_for(sigma_begin, sigma_end, gamma)
    num_scales = technique2 if num_scales is None else num_scales
    sigma_ratio = geometric_ratio(sigma_begin, sigma_end, num_scales)
    step_lr = best_step_lr(n_steps_each, sigma_ratio, sigma_end)
    return Recommendation(
        dim=int(dim), sigma_begin=float(sigma_begin), sigma_end=float(sigma_end), gamma=gamma,
        num_scales=num_scales, sigma_ratio=sigma_ratio, n_steps_each=int(n_steps_each),
        step_lr=step_lr,
        variance_ratio=variance_ratio(step_lr, n_steps_each, sigma_ratio, sigma_end),
        technique2_num_scales=technique2)


# --- Technique 1 -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PairwiseDistanceResult:
    """The largest distance found, and over which examples it was taken."""
    distance: float
    dim: int  # values per example (H*W*C)
    num_examples: int  # examples whose pairs were compared
    dataset_size: int  # examples in the dataset
    exact: bool  # every pair of the dataset was compared

    @property
    def method(self) -> str:
        if self.exact:
            return f"exact over all {self.dataset_size:,} examples"
        return (f"uniform random subsample of {self.num_examples:,} of "
                f"{self.dataset_size:,} examples")


def default_max_examples(dim: int) -> int:
    """Subsample size for Technique 1: 20,000, or fewer if 20,000 float32 images exceed 2 GiB."""
    return max(2, min(SUBSAMPLE_SIZE, SUBSAMPLE_BYTES // (4 * _positive_int(dim, "dim"))))


def max_pairwise_distance(images: tf.data.Dataset, *, max_examples: int | None = None,
                          exact: bool = False, block_size: int = 1024, seed: int = 0,
                          progress: bool = True) -> PairwiseDistanceResult:
    """Technique 1: the largest Euclidean distance between two elements of `images`.

    `images` yields one example per element (unbatched), a float tensor of any fixed shape,
    e.g. `ncsn_tf.data.load(config, training=False)`; it must yield the same elements in the
    same order every time it is iterated (no shuffling or random augmentation).

    Default: one pass; if the dataset has more than `max_examples` examples (None: 20,000, fewer
    for images so large that these would exceed 2 GiB), the maximum is taken over a uniformly
    random subsample of that size (reservoir sampling, seeded), held in memory.
    `exact=True` compares every pair without holding the dataset: it keeps one block of
    `block_size` examples and streams the blocks after it past, so it iterates the dataset
    1 + ⌈N/block_size⌉ times (about N²/(2·block_size) examples read in all) and does about
    N²·D/2 multiply-adds; memory is about
    (2·block_size·D + block_size²)·4 bytes. Distances are computed blockwise as
    ‖a‖² + ‖b‖² − 2a·b with matmuls; the farthest pair of each block is then measured directly.
    """
    if not isinstance(images.element_spec, tf.TensorSpec):
        raise TypeError("max_pairwise_distance expects a dataset of image tensors, got elements "
                        f"{images.element_spec}; map it to the image first, e.g. "
                        "ds.map(lambda example: example['image'])")
    block_size = _positive_int(block_size, "block_size")
    if exact and max_examples is not None:
        raise ValueError("exact=True compares every example; leave max_examples unset")
    if max_examples is not None and _positive_int(max_examples, "max_examples") < 2:
        raise ValueError(f"max_examples must be at least 2, got {max_examples}")
    if images.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError("The dataset of images is infinite (repeated); pass one epoch")
    meter = _Progress(progress, _known_size(images), block_size)
    try:
        if exact:
            max_sq, size, dim = _exact_max_sq_distance(images, block_size, meter)
            used = size
        else:
            sample, size = _reservoir_sample(_blocks(images, block_size), max_examples, seed,
                                             meter)
            used, dim = sample.shape
            max_sq = _in_memory_max_sq_distance(sample, block_size) if used >= 2 else 0.0
    except tf.errors.InvalidArgumentError as e:
        raise ValueError("All images must have the same number of values (H*W*C) to measure "
                         f"distances between them: {e.message}") from e
    if size < 2:
        raise ValueError(f"Need at least 2 examples to measure a distance, the dataset has {size}")
    meter.done()
    return PairwiseDistanceResult(distance=math.sqrt(max_sq), dim=dim, num_examples=used,
                                  dataset_size=size, exact=used == size)


@tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)] * 2)
def _block_max_sq_distance(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Largest ‖a_i − b_j‖² over the rows of two blocks, without materialising any a_i − b_j."""
    sq = (tf.reduce_sum(tf.square(a), axis=1)[:, None] + tf.reduce_sum(tf.square(b), axis=1)[None]
          - 2.0 * tf.matmul(a, b, transpose_b=True))
    k = tf.argmax(tf.reshape(sq, [-1]), output_type=tf.int32)
    cols = tf.shape(b)[0]
    # The expansion cancels badly in float32; measure the winning pair directly instead.
    return tf.reduce_sum(tf.square(a[k // cols] - b[k % cols]))


def _blocks(images: tf.data.Dataset, block_size: int, skip: int = 0) -> tf.data.Dataset:
    """[≤ block_size, D] float32 blocks of flattened examples, from example `skip` on."""
    return (images.skip(skip).map(lambda x: tf.reshape(tf.cast(x, tf.float32), [-1]))
            .batch(block_size).prefetch(2))


def _exact_max_sq_distance(images: tf.data.Dataset, block_size: int,
                           meter: _Progress) -> tuple[float, int, int]:
    max_sq, size, dim = 0.0, 0, 0
    for i, outer in enumerate(_blocks(images, block_size)):
        size, dim = size + int(outer.shape[0]), int(outer.shape[1])
        meter.add(int(outer.shape[0]), i)
        max_sq = max(max_sq, float(_block_max_sq_distance(outer, outer)))
        for inner in _blocks(images, block_size, skip=(i + 1) * block_size):
            meter.add(int(inner.shape[0]), i)
            max_sq = max(max_sq, float(_block_max_sq_distance(outer, inner)))
    return max_sq, size, dim


def _reservoir_sample(blocks: tf.data.Dataset, max_examples: int | None, seed: int,
                      meter: _Progress) -> tuple[np.ndarray, int]:
    """A uniform random sample without replacement of the stream (Algorithm R), and its size."""
    rng = np.random.default_rng(seed)
    reservoir, size = None, 0
    for block in blocks:
        block = block.numpy()
        if reservoir is None:
            capacity = max_examples or default_max_examples(block.shape[1])
            reservoir = np.empty((capacity, block.shape[1]), np.float32)  # pages touched lazily
        index = np.arange(size, size + block.shape[0])
        fill = index < capacity
        reservoir[index[fill]] = block[fill]
        if not fill.all():
            # Example t (0-based) replaces a uniformly chosen slot j ≤ t if j < capacity.
            slots = rng.integers(0, index[~fill] + 1)
            taken = slots < capacity
            slots, rows = slots[taken], block[~fill][taken]
            # Two examples of this block may pick one slot: the later one wins, as in Algorithm R.
            _, last = np.unique(slots[::-1], return_index=True)
            keep = slots.size - 1 - last
            reservoir[slots[keep]] = rows[keep]
        size += block.shape[0]
        meter.add(block.shape[0])
    if reservoir is None:
        return np.zeros((0, 0), np.float32), 0
    return reservoir[:min(size, capacity)], size


def _in_memory_max_sq_distance(points: np.ndarray, block_size: int) -> float:
    max_sq = 0.0
    for i in range(0, len(points), block_size):
        for j in range(i, len(points), block_size):
            max_sq = max(max_sq, float(_block_max_sq_distance(points[i:i + block_size],
                                                              points[j:j + block_size])))
    return max_sq


def _known_size(dataset: tf.data.Dataset) -> int | None:
    size = int(dataset.cardinality())
    return size if size >= 0 else None


class _Progress:
    """Logs examples read (re-reads included) and the rate, every 10 s and at the end."""

    def __init__(self, enabled: bool, total: int | None, block_size: int,
                 interval_s: float = 10.0):
        self.enabled, self.total = enabled, total
        self.blocks = -(-total // block_size) if total else None
        self.meter = progress.Progress(every_s=interval_s)
        self.outer_block = None

    def add(self, n: int, outer_block: int | None = None) -> None:
        """`n` more examples read; `outer_block`: index of the block held (exact pass)."""
        self.meter.advance(n)
        self.outer_block = outer_block
        if self.enabled and self.meter.due():
            self._log("")

    def done(self) -> None:
        if self.enabled:
            self._log(", done")

    def _log(self, suffix: str) -> None:
        where = [f"dataset of {self.total:,}"] if self.total else []
        if self.outer_block is not None:
            where.append(f"block {self.outer_block + 1:,} of {self.blocks or '?'}")
        where = f" ({', '.join(where)})" if where else ""
        logging.info("max pairwise distance: %s examples read%s, %s examples/s%s",
                     f"{self.meter.done:,.0f}", where, f"{self.meter.rate:,.0f}", suffix)


def _positive_int(value, name: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def _check_sigma_range(sigma_begin: float, sigma_end: float) -> None:
    if not (sigma_end > 0.0 and sigma_begin > sigma_end and math.isfinite(sigma_begin)):
        raise ValueError("Noise scales need sigma_begin > sigma_end > 0 (both finite), got "
                         f"sigma_begin={sigma_begin}, sigma_end={sigma_end}")
