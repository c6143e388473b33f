"""Building blocks of the NCSNv2 score networks: a RefineNet with InstanceNorm++ and ELU (NHWC).

Every block computes what its namesake in the official PyTorch code computes. All convolutions
are stride 1 with symmetric padding `dilation * (k // 2)`, which is TensorFlow's "same" padding
for odd kernels; downsampling is 2x2 mean pooling after a convolution; multi-resolution fusion
upsamples bilinearly with `align_corners=True`, as `F.interpolate` does there. Attribute names
follow the official module names (`conv1`, `normalize2`, `shortcut`, `adapt_convs`, ...) so that
`ncsn_tf.convert` can map official weights by name. Sublayers are grouped in tuples, never
lists: tf.train.Checkpoint does not see layers inside Keras 3's list wrappers.

Mixed precision: pass a Keras dtype policy as `dtype` (e.g. "mixed_bfloat16"); convolutions
compute in the compute dtype, InstanceNorm++ statistics are always float32, and the ELU after a
norm is applied in float32 before the result is cast down (one rounding, and CPUs have no native
bfloat16 elementwise arithmetic, so it is also faster there).
"""
from __future__ import annotations

import math
from typing import Sequence

import keras
import tensorflow as tf


_HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


def _native_dilation_dtypes() -> frozenset[tf.DType]:
    """Compute dtypes for which TensorFlow runs (and differentiates) a dilated Conv2D as one
    op here: all on a GPU, float32 and bfloat16 with oneDNN (the default on x86 CPUs), none with
    TF's plain CPU kernels."""
    if _HAS_GPU:
        return frozenset({tf.float32, tf.bfloat16, tf.float16})
    try:
        from tensorflow.python.util import _pywrap_util_port
        onednn = _pywrap_util_port.IsMklEnabled()
    except (ImportError, AttributeError):
        onednn = False
    return frozenset({tf.float32, tf.bfloat16}) if onednn else frozenset()


class Conv2D(keras.layers.Conv2D):
    """Keras' Conv2D, except that a dilated convolution runs as one native Conv2D op.

    Keras (through `tf.nn.convolution`) computes it as SpaceToBatch → convolution on small
    blocks → BatchToSpace, which makes NCSNv2's dilated stages markedly slower with oneDNN; the
    native op gives the same result. Where TensorFlow has no native kernel for the compute dtype
    (see `NATIVE_DILATION_DTYPES`), Keras' way is kept.
    """

    NATIVE_DILATION_DTYPES = _native_dilation_dtypes()

    def convolution_op(self, inputs, kernel):
        if self.dilation_rate == (1, 1) or inputs.dtype not in self.NATIVE_DILATION_DTYPES:
            return super().convolution_op(inputs, kernel)
        return tf.nn.conv2d(inputs, kernel, strides=1, padding=self.padding.upper(),
                            dilations=self.dilation_rate)


def elu(x: tf.Tensor) -> tf.Tensor:
    """ELU in x's dtype, computed in float32 for bfloat16 inputs when there is no GPU: CPUs
    convert bfloat16 elementwise math to float32 anyway, and doing it explicitly is faster."""
    if x.dtype == tf.bfloat16 and not _HAS_GPU:
        return tf.cast(tf.nn.elu(tf.cast(x, tf.float32)), x.dtype)
    return tf.nn.elu(x)


def _uniform(bound: float) -> keras.initializers.Initializer:
    """U(±bound) with a seed of its own. A Keras 3 initializer object draws from one fixed seed,
    so one object shared by two weights would give them the same numbers (a bias equal to the
    first kernel row): every weight gets a fresh initializer."""
    return keras.initializers.RandomUniform(-bound, bound)


def _near_one() -> keras.initializers.Initializer:
    """N(1, 0.02) with a seed of its own (see `_uniform`), as `normal_(1, 0.02)` in PyTorch."""
    return keras.initializers.RandomNormal(mean=1.0, stddev=0.02)


def conv2d(in_channels: int, filters: int, kernel_size: int = 3, dilation: int = 1,
           use_bias: bool = True, dtype=None) -> keras.layers.Conv2D:
    """A stride-1 "same" convolution initialised like `torch.nn.Conv2d` (kernel and bias drawn
    independently from U(±1/√fan_in)), its weights created right away."""
    bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
    conv = Conv2D(filters, kernel_size, padding="same", dilation_rate=dilation,
                  use_bias=use_bias, kernel_initializer=_uniform(bound),
                  bias_initializer=_uniform(bound), dtype=dtype)
    conv.build((None, None, None, in_channels))
    return conv


class InstanceNormPlus(keras.layers.Layer):
    """InstanceNorm++ (NCSN, Song & Ermon 2019): instance norm that keeps the channel means.

    out = γ·(x̂ + α·m̂) + β, where x̂ normalises each channel of each image over its pixels
    (biased variance, ε=1e-5) and m̂ standardises the per-channel means across channels
    (unbiased variance, ε=1e-5). Statistics are taken in float32 whatever the compute dtype;
    the result is returned in the compute dtype. Weights: `alpha`, `gamma` ~ N(1, 0.02), `beta` 0.
    With `elu=True` the layer applies ELU to its output too, still in float32: in NCSNv2 every
    norm is followed by an ELU, and fusing the two saves a pass and a rounding in bf16/fp16.
    """

    def __init__(self, channels: int, elu: bool = False, **kwargs):
        # Inputs are taken as they come (cast to float32 below), not cast to the compute dtype.
        super().__init__(autocast=False, **kwargs)
        if channels < 2:
            raise ValueError(f"InstanceNorm++ needs at least 2 channels, got {channels}")
        self.elu = elu
        # autocast=False: the affine weights stay float32 like the statistics.
        self.alpha = self.add_weight(name="alpha", shape=(channels,), initializer=_near_one(),
                                     autocast=False)
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer=_near_one(),
                                     autocast=False)
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros",
                                    autocast=False)

    def call(self, x):
        x = tf.cast(x, tf.float32)
        mean, var = tf.nn.moments(x, axes=[1, 2])  # [B, C] each
        channels = mean.shape[-1]
        mean_of_means, var_of_means = tf.nn.moments(mean, axes=[-1], keepdims=True)
        var_of_means *= channels / (channels - 1)  # torch.var is unbiased
        mean_hat = (mean - mean_of_means) * tf.math.rsqrt(var_of_means + 1e-5)
        inv_std = tf.math.rsqrt(var + 1e-5)
        # γ·((x - μ)/σ + α·m̂) + β folded into one multiply-add over the feature map.
        scale = self.gamma * inv_std
        shift = self.beta + self.gamma * (self.alpha * mean_hat - mean * inv_std)
        out = x * scale[:, None, None, :] + shift[:, None, None, :]
        if self.elu:
            out = tf.nn.elu(out)
        return tf.cast(out, self.compute_dtype)


class ConvMeanPool(keras.layers.Layer):
    """A convolution followed by 2x2 mean pooling (halves height and width)."""

    def __init__(self, in_channels: int, filters: int, kernel_size: int, **kwargs):
        super().__init__(**kwargs)
        self.conv = conv2d(in_channels, filters, kernel_size, dtype=self.dtype_policy)

    def call(self, x):
        return tf.nn.avg_pool2d(self.conv(x), ksize=2, strides=2, padding="VALID")


class ResidualBlock(keras.layers.Layer):
    """Pre-activation residual block: norm → ELU → conv → norm → ELU → conv, plus a shortcut.

    `resample="down"` halves the resolution by mean pooling, except with a `dilation`: then the
    official code uses dilated convolutions and does not pool at all (the resolution is kept),
    and this block does the same. The shortcut is a convolution whenever the block resamples or
    changes the channel count (1x1, pooled 1x1, or dilated 3x3, as in the official code).
    """

    def __init__(self, in_channels: int, out_channels: int, resample: str | None = None,
                 dilation: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if resample not in (None, "down"):
            raise ValueError(f"resample must be None or 'down', got {resample!r}")
        dt = self.dtype_policy
        hidden = in_channels if resample == "down" else out_channels
        # Each norm applies the ELU that follows it (see InstanceNormPlus).
        self.normalize1 = InstanceNormPlus(in_channels, elu=True, dtype=dt)
        self.normalize2 = InstanceNormPlus(hidden, elu=True, dtype=dt)
        self.shortcut = None
        if resample == "down" and dilation is None:
            self.conv1 = conv2d(in_channels, in_channels, dtype=dt)
            self.conv2 = ConvMeanPool(in_channels, out_channels, 3, dtype=dt)
            self.shortcut = ConvMeanPool(in_channels, out_channels, 1, dtype=dt)
            return
        self.conv1 = conv2d(in_channels, hidden, dilation=dilation or 1, dtype=dt)
        self.conv2 = conv2d(hidden, out_channels, dilation=dilation or 1, dtype=dt)
        if resample == "down" or in_channels != out_channels:
            kernel = 1 if dilation is None else 3
            self.shortcut = conv2d(in_channels, out_channels, kernel, dilation=dilation or 1,
                                   dtype=dt)

    def call(self, x):
        h = self.conv1(self.normalize1(x))  # norm → ELU → conv
        h = self.conv2(self.normalize2(h))
        return h + (x if self.shortcut is None else self.shortcut(x))


class RCUBlock(keras.layers.Layer):
    """Residual conv unit: `n_blocks` times x ← x + (ELU → 3x3 conv without bias)^n_stages (x).

    `convs[i * n_stages + j]` is the official `{i+1}_{j+1}_conv`.
    """

    def __init__(self, channels: int, n_blocks: int, n_stages: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.n_blocks, self.n_stages = n_blocks, n_stages
        self.convs = tuple(conv2d(channels, channels, use_bias=False, dtype=self.dtype_policy)
                           for _ in range(n_blocks * n_stages))

    def call(self, x):
        for i in range(self.n_blocks):
            h = x
            for conv in self.convs[i * self.n_stages:(i + 1) * self.n_stages]:
                h = conv(elu(h))
            x = h + x
        return x


class CRPBlock(keras.layers.Layer):
    """Chained residual pooling: after ELU, repeatedly 5x5 max-pool (stride 1) → 3x3 conv,
    adding every stage's output to the running sum.

    The official pooling pads by 2 with -inf, which is exactly "SAME" max pooling.
    """

    def __init__(self, channels: int, n_stages: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.convs = tuple(conv2d(channels, channels, use_bias=False, dtype=self.dtype_policy)
                           for _ in range(n_stages))

    def call(self, x):
        x = elu(x)
        path = x
        for conv in self.convs:
            path = conv(tf.nn.max_pool2d(path, ksize=5, strides=1, padding="SAME"))
            x = x + path
        return x


def _resize_like(h: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Bilinear resize of `h` to the height/width of `target`, align_corners=True (a no-op when
    the sizes already agree, which is exact for align_corners)."""
    if h.shape[1:3] == target.shape[1:3] and None not in h.shape[1:3]:
        return h
    resized = tf.raw_ops.ResizeBilinear(images=h, size=tf.shape(target)[1:3],
                                        align_corners=True, half_pixel_centers=False)
    return tf.cast(resized, h.dtype)  # the resize kernel always returns float32


class MSFBlock(keras.layers.Layer):
    """Multi-resolution fusion: a 3x3 conv (with bias) per input, upsampled to the resolution of
    the first input, summed."""

    def __init__(self, in_channels: Sequence[int], channels: int, **kwargs):
        super().__init__(**kwargs)
        self.convs = tuple(conv2d(c, channels, dtype=self.dtype_policy) for c in in_channels)

    def call(self, xs):
        out = self.convs[0](xs[0])
        for conv, x in zip(self.convs[1:], xs[1:]):
            out = out + _resize_like(conv(x), out)
        return out


class RefineBlock(keras.layers.Layer):
    """RefineNet block: an RCU per input (2 blocks), fusion (when there are several inputs) at
    the first input's resolution, CRP, then an output RCU (3 blocks if `end`, else 1)."""

    def __init__(self, in_channels: Sequence[int], channels: int, end: bool = False, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.adapt_convs = tuple(RCUBlock(c, 2, 2, dtype=dt) for c in in_channels)
        self.msf = MSFBlock(in_channels, channels, dtype=dt) if len(in_channels) > 1 else None
        self.crp = CRPBlock(channels, 2, dtype=dt)
        self.output_convs = RCUBlock(channels, 3 if end else 1, 2, dtype=dt)

    def call(self, xs):
        hs = [rcu(x) for rcu, x in zip(self.adapt_convs, xs)]
        h = hs[0] if self.msf is None else self.msf(hs)
        return self.output_convs(self.crp(h))
