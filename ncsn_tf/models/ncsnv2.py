"""The NCSNv2 score networks (NCSNv2, NCSNv2Deeper, NCSNv2Deepest) as Keras models, NHWC.

Usage: `score = net(x, labels)` with `x` in [0, 1], shape [B, H, W, C], and `labels` the integer
noise-level indices [B]; the score has the shape of `x` and is float32. The network sees 2x - 1
and follows Technique 3 of the paper: an unconditional RefineNet whose output is divided by
`sigmas[labels]`, where `sigmas` is a non-trainable weight of the model. Because of that, the
score is defined at any noise level: `net.score(x, sigma)` takes a float σ per example [B]
(continuous samplers), and equals `net(x, labels)` at the table's values.
"""
from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from ncsn_tf.models.layers import InstanceNormPlus, RefineBlock, ResidualBlock, conv2d


class RefineNetScore(keras.Model):
    """Base of the three networks: encoder of residual stages, decoder of RefineNet blocks,
    then norm → ELU → 3x3 conv, divided by σ.

    `STAGES` lists, from the input resolution down, (encoder attribute, decoder attribute,
    channel multiplier of ngf, resample, dilation) in the official module names. Each stage has
    two residual blocks, the first one resampling. Its decoder block fuses the stage output with
    the deeper decoder output and emits the channel count of the previous stage.
    """

    STAGES: tuple[tuple[str, str, int, str | None, int | None], ...] = ()

    def __init__(self, channels: int, ngf: int, sigmas: Sequence[float], **kwargs):
        kwargs.setdefault("name", type(self).__name__.lower())
        # No input autocast: x stays float32 until begin_conv casts it to the compute dtype.
        super().__init__(autocast=False, **kwargs)
        self.channels, self.ngf = channels, ngf
        sigmas = np.asarray(sigmas, dtype=np.float32)
        if sigmas.ndim != 1 or sigmas.size == 0:
            raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {sigmas.shape}")
        self.sigmas = self.add_weight(
            name="sigmas", shape=sigmas.shape, dtype="float32", trainable=False, autocast=False,
            initializer=lambda shape, dtype=None: tf.constant(sigmas))
        dt = self.dtype_policy
        self.begin_conv = conv2d(channels, ngf, dtype=dt)
        widths = [ngf * mult for _, _, mult, _, _ in self.STAGES]
        previous = ngf
        for i, (res, refine, _, resample, dilation) in enumerate(self.STAGES):
            width = widths[i]
            setattr(self, res, (  # a tuple: checkpoints do not see layers in lists
                ResidualBlock(previous, width, resample, dilation, dtype=dt),
                ResidualBlock(width, width, None, dilation, dtype=dt)))
            previous = width
            deepest = i == len(self.STAGES) - 1
            setattr(self, refine, RefineBlock(
                [width] if deepest else [width, width],
                width if deepest else widths[max(i - 1, 0)], end=i == 0, dtype=dt))
        self.normalizer = InstanceNormPlus(ngf, elu=True, dtype=dt)
        self.end_conv = conv2d(ngf, channels, dtype=dt)
        # Every weight was created above, so no input shape is needed. Mark the sublayers
        # built too: otherwise Keras tries to build them symbolically under a strategy scope.
        for layer in self._flatten_layers(include_self=True):
            layer.built = True

    @classmethod
    def downsampling(cls) -> int:
        """Total downsampling factor: image sizes must be multiples of it."""
        return 2 ** sum(1 for *_, resample, dilation in cls.STAGES
                        if resample == "down" and dilation is None)

    @classmethod
    def check_image_size(cls, height: int | None, width: int | None = None) -> None:
        """Raises ValueError unless the pooling stages can halve (height, width) evenly."""
        factor = cls.downsampling()
        for size in (height, width if width is not None else height):
            if size is not None and (size < factor or size % factor):
                raise ValueError(
                    f"{cls.__name__} halves the resolution {factor.bit_length() - 1} times, so "
                    f"image height and width must be positive multiples of {factor}; got "
                    f"{height}x{width or height}. Resize the images or pick another "
                    "architecture with --arch.")

    def call(self, x, labels, training=None):
        # Divide in float32: with float16 the 1/σ_L amplification could overflow.
        return self._unconditional(x) / tf.gather(self.sigmas, labels)[:, None, None, None]

    def score(self, x, sigma) -> tf.Tensor:
        """s(x, σ) = network(2x − 1)/σ at any noise levels `sigma` (float, [B]), float32; the
        network's inference mode (NCSNv2 has no dropout or batch statistics)."""
        sigma = tf.cast(tf.convert_to_tensor(sigma), tf.float32)
        return self._unconditional(x) / sigma[:, None, None, None]

    def _unconditional(self, x) -> tf.Tensor:
        """The RefineNet's output before the division by σ, float32."""
        self.check_image_size(x.shape[1], x.shape[2])
        h = self.begin_conv(2.0 * tf.cast(x, tf.float32) - 1.0)
        skips = []
        for res, _, _, _, _ in self.STAGES:
            for block in getattr(self, res):
                h = block(h)
            # A no-op that keeps TF's grappler remapper from fusing conv + bias + residual add
            # + ELU across this skip connection: that fusion mishandles the add's other users
            # and makes the remapper give up on the whole graph (logged as an error).
            h = tf.ensure_shape(h, h.shape)
            skips.append(h)
        refines = [getattr(self, refine) for _, refine, _, _, _ in self.STAGES]
        h = refines[-1]([skips[-1]])
        for skip, refine in zip(skips[-2::-1], refines[-2::-1]):
            h = refine([skip, h])
        h = self.end_conv(self.normalizer(h))  # norm → ELU → conv
        return tf.cast(h, tf.float32)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "ngf": self.ngf,
                "sigmas": [float(s) for s in keras.ops.convert_to_numpy(self.sigmas)]}


class NCSNv2(RefineNetScore):
    """The official network for CIFAR-10 (32 px) and CelebA (64 px); 29.7 M weights at ngf 128.

    Only res2 pools: res3 and res4 are "down" blocks with dilation, which keep the resolution.
    (For 28x28 inputs the official code asks res4 for adjusted padding, but the dilated branch
    ignores it, so 28x28 goes through the same computation.)
    """

    STAGES = (
        ("res1", "refine4", 1, None, None),
        ("res2", "refine3", 2, "down", None),
        ("res3", "refine2", 2, "down", 2),
        ("res4", "refine1", 2, "down", 4),
    )


class NCSNv2Deeper(RefineNetScore):
    """The official network for LSUN (96-128 px); 83.4 M weights at ngf 128."""

    STAGES = (
        ("res1", "refine5", 1, None, None),
        ("res2", "refine4", 2, "down", None),
        ("res3", "refine3", 2, "down", None),
        ("res4", "refine2", 4, "down", 2),
        ("res5", "refine1", 4, "down", 4),
    )


class NCSNv2Deepest(RefineNetScore):
    """The official network for FFHQ (256 px); 94.1 M weights at ngf 128."""

    STAGES = (
        ("res1", "refine5", 1, None, None),
        ("res2", "refine4", 2, "down", None),
        ("res3", "refine3", 2, "down", None),
        ("res31", "refine31", 2, "down", None),
        ("res4", "refine2", 4, "down", 2),
        ("res5", "refine1", 4, "down", 4),
    )
