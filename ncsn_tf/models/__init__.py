"""NCSNv2 score networks and `build(config)`, which picks and builds one from a config."""
from __future__ import annotations

from ncsn_tf import noise
from ncsn_tf.config import presets
from ncsn_tf.models.layers import (CRPBlock, ConvMeanPool, InstanceNormPlus, MSFBlock, RCUBlock,
                                   RefineBlock, ResidualBlock)
from ncsn_tf.models.ncsnv2 import NCSNv2, NCSNv2Deeper, NCSNv2Deepest, RefineNetScore

ARCHITECTURES: dict[str, type[RefineNetScore]] = {
    "ncsnv2": NCSNv2,
    "ncsnv2_deeper": NCSNv2Deeper,
    "ncsnv2_deepest": NCSNv2Deepest,
}

# `config.training.precision` → Keras dtype policy.
PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def arch_name(config: presets.Config) -> str:
    """The architecture `config.model.arch` resolves to; "auto" picks by resolution like the
    official configs: ≤64 px NCSNv2, 65-128 px NCSNv2Deeper, larger NCSNv2Deepest."""
    arch = config.model.arch
    if arch == "auto":
        size = config.data.image_size
        return "ncsnv2" if size <= 64 else "ncsnv2_deeper" if size <= 128 else "ncsnv2_deepest"
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown arch {arch!r}; expected 'auto' or one of "
                         f"{', '.join(ARCHITECTURES)}")
    return arch


def dtype_policy(config: presets.Config) -> str:
    """The Keras dtype policy named by `config.training.precision`."""
    precision = config.training.precision
    if precision not in PRECISION_POLICIES:
        raise ValueError(f"Unknown precision {precision!r}; expected one of "
                         f"{', '.join(PRECISION_POLICIES)}")
    return PRECISION_POLICIES[precision]


def build(config: presets.Config) -> RefineNetScore:
    """The score network for `config`, its weights created (ready to checkpoint or restore).

    Precision comes from `config.training.precision` as the layers' dtype policy; no global
    policy is set.
    """
    cls = ARCHITECTURES[arch_name(config)]
    size = config.data.image_size
    cls.check_image_size(size)
    m = config.model
    sigmas = noise.get_sigmas(m.sigma_begin, m.sigma_end, m.num_scales, m.sigma_dist)
    return cls(config.data.channels, m.ngf, sigmas, dtype=dtype_policy(config))


__all__ = ["ARCHITECTURES", "PRECISION_POLICIES", "RefineNetScore", "NCSNv2", "NCSNv2Deeper",
           "NCSNv2Deepest", "InstanceNormPlus", "ConvMeanPool", "ResidualBlock", "RCUBlock",
           "CRPBlock", "MSFBlock", "RefineBlock", "arch_name", "dtype_policy", "build"]
