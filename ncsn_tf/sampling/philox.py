"""Per-seed random draws for a whole batch in a constant number of batched ops.

`uniform(seeds, counter, shape)[n]` equals `tf.random.stateless_uniform(shape,
seed=(seeds[n], counter), alg="philox")` bit for bit, and `normal(...)[n]` equals
`tf.random.stateless_normal` with the same seed up to the last bit of log/sin/cos. One call
costs a fixed number of elementwise ops on [N, ⌈D/4⌉] tensors, whatever the batch size N,
where a `tf.map_fn` over the seeds runs N small ops; and image n's draw depends on its seed
only, not on its batch.

It is TensorFlow's own generator written out in tensor ops: the seed pair is mixed into a
Philox-4x32-10 key and counter (as `StatelessRandomGetKeyCounter` does), element group g of
the output comes from Philox(key, counter + g), 4 × 32 bits per group, turned into floats as
TensorFlow's kernels do (23 mantissa bits; Box–Muller for normals). The 32-bit words live in
int64 tensors so that every op used exists for int64 on CPU, GPU and XLA.
"""
from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

_MASK32 = 0xFFFFFFFF
_ROUND_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
_SEED_MIXING_KEY = (0x3EC8F720, 0x02461E29)  # StatelessRandomGetKeyCounter's fixed key
_ROUNDS = 10
_BOX_MULLER_EPSILON = 1.0e-7


def uniform(seeds: tf.Tensor, counter, shape: Sequence[int]) -> tf.Tensor:
    """U[0, 1) of `shape` per seed: [N, *shape] for int64 `seeds` [N], `counter` a scalar."""
    words = _words(seeds, counter, shape)
    return _reshape(_to_unit_float(words), shape)


def normal(seeds: tf.Tensor, counter, shape: Sequence[int]) -> tf.Tensor:
    """N(0, 1) of `shape` per seed: [N, *shape] for int64 `seeds` [N], `counter` a scalar."""
    w0, w1, w2, w3 = tf.unstack(_words(seeds, counter, shape), axis=-1)
    f0, f1 = _box_muller(w0, w1)
    f2, f3 = _box_muller(w2, w3)
    return _reshape(tf.stack([f0, f1, f2, f3], axis=-1), shape)


def _words(seeds, counter, shape) -> tf.Tensor:
    """[N, ⌈D/4⌉, 4] Philox outputs (32-bit values in int64) for each seed's stream."""
    seeds = tf.cast(seeds, tf.int64)
    counter = tf.cast(counter, tf.int64) * tf.ones_like(seeds)
    # The seed pair (seed, counter) becomes a key and a counter, as TensorFlow mixes them.
    mix = _philox([seeds & _MASK32, _shift(seeds, -32) & _MASK32, counter & _MASK32,
                   _shift(counter, -32) & _MASK32],
                  [tf.fill(tf.shape(seeds), tf.constant(k, tf.int64)) for k in _SEED_MIXING_KEY])
    key = [m[:, None] for m in mix[:2]]
    groups = tf.range(-(-math.prod(shape) // 4), dtype=tf.int64)[None, :]
    zeros = tf.zeros_like(groups) + tf.zeros_like(key[0])  # [N, G]
    # Group g is Philox(key, counter + g); the mixed counter's low words are 0, so g never
    # carries into the high words.
    block = [groups + zeros, zeros, mix[2][:, None] + zeros, mix[3][:, None] + zeros]
    return tf.stack(_philox(block, key), axis=-1)


def _philox(counter: list, key: list) -> list:
    """Philox-4x32-10 of a 4-word counter under a 2-word key (int64 tensors of 32-bit values)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(_ROUNDS):
        if r:
            k0 = (k0 + _KEY_INCREMENTS[0]) & _MASK32
            k1 = (k1 + _KEY_INCREMENTS[1]) & _MASK32
        hi0, lo0 = _mulhilo(_ROUND_MULTIPLIERS[0], c0)
        hi1, lo1 = _mulhilo(_ROUND_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def _mulhilo(a: int, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """High and low 32 bits of the 64-bit product a·b, without overflowing int64."""
    upper = a * _shift(b, -16)  # < 2^48
    lower = a * (b & 0xFFFF) + _shift(upper & 0xFFFF, 16)  # < 2^49
    return _shift(upper, -16) + _shift(lower, -32), lower & _MASK32


def _shift(x: tf.Tensor, bits: int) -> tf.Tensor:
    """x shifted left by `bits` (right when negative)."""
    if bits < 0:
        return tf.bitwise.right_shift(x, tf.constant(-bits, x.dtype))
    return tf.bitwise.left_shift(x, tf.constant(bits, x.dtype))


def _to_unit_float(words: tf.Tensor) -> tf.Tensor:
    """[0, 1) floats from the 23 low bits of 32-bit words, as TensorFlow's Uint32ToFloat."""
    bits = tf.cast((words & 0x7FFFFF) | 0x3F800000, tf.int32)
    return tf.bitcast(bits, tf.float32) - 1.0


def _box_muller(x0: tf.Tensor, x1: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Two N(0, 1) floats from two 32-bit words (TensorFlow's BoxMullerFloat)."""
    u1 = tf.maximum(_to_unit_float(x0), _BOX_MULLER_EPSILON)
    # 2π·u is formed in double and rounded once, as the C++ expression `2.0f * M_PI * u` is;
    # log, sin and cos in double, rounded to float: glibc's logf/sinf/cosf, which the kernel
    # calls, differ from that in the last bit for about 1% of values.
    v1 = tf.cast(2.0 * math.pi * tf.cast(_to_unit_float(x1), tf.float64), tf.float32)
    v1 = tf.cast(v1, tf.float64)
    log_u1 = tf.cast(tf.math.log(tf.cast(u1, tf.float64)), tf.float32)
    radius = tf.sqrt(-2.0 * log_u1)
    return (tf.cast(tf.sin(v1), tf.float32) * radius, tf.cast(tf.cos(v1), tf.float32) * radius)


def _reshape(groups: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """[N, G, 4] → [N, *shape], dropping the padding of the last group."""
    size = math.prod(shape)
    flat = tf.reshape(groups, [tf.shape(groups)[0], -1])[:, :size]
    return tf.reshape(flat, tf.concat([[tf.shape(groups)[0]], list(shape)], 0))
