"""Samplers of a trained score network: one driver (ncsn_tf.sampling.driver: seeds, chunks,
inpainting, interpolation, trajectories) and one small module per update rule.

| name   | module | algorithm                                              | NFE per image     |
|--------|--------|--------------------------------------------------------|-------------------|
| `ald`  | ald    | annealed Langevin dynamics (NCSNv2 Algorithm 1)        | L·T (+1 denoise)  |
| `cas`  | cas    | consistent annealed sampling                           | N (+1 denoise)    |
| `pc`   | pc     | VE-SDE ancestral predictor + Langevin corrector        | N·(M + 1)         |
| `heun` | heun   | Heun's method with Karras' churn, ρ-spaced σ           | 2N − 1            |
| `dpm`  | dpm    | second-order multistep SDE solver on the denoiser      | N                 |

`for_network(net, config)` builds the sampler that `config.sampling` names for an NCSNv2
network (`ald` on the σ table through `net(x, labels)`, the others through the continuous
`net.score(x, sigma)` between the table's σ_1 and σ_L).
"""
from __future__ import annotations

from ncsn_tf.config import presets
from ncsn_tf.sampling.ald import AnnealedLangevin
from ncsn_tf.sampling.cas import ConsistentAnnealed
from ncsn_tf.sampling.dpm import DPMSolver
from ncsn_tf.sampling.driver import DIAGNOSTICS, Sampler, ScoreFn, write_diagnostics
from ncsn_tf.sampling.heun import HeunODE, karras_sigmas
from ncsn_tf.sampling.pc import PredictorCorrector

SAMPLERS = {cls.name: cls for cls in (AnnealedLangevin, ConsistentAnnealed, PredictorCorrector,
                                      HeunODE, DPMSolver)}
# num_steps when the config says 0: CAS matches ALD's NFE; PC takes one corrector step per
# level of the table; Heun 25 levels (49 NFE: on the digits models 18 gave more malformed
# digits and a lower precision, bench/results/samplers_digits.md).
DEFAULT_NUM_STEPS = {"cas": lambda L, T: L * T, "pc": lambda L, T: L, "heun": lambda L, T: 25,
                     "dpm": lambda L, T: 12}


def num_steps(config: presets.Config) -> int:
    """The levels the configured sampler walks (L for ald)."""
    s, L = config.sampling, config.model.num_scales
    if s.sampler == "ald":
        return L
    return s.num_steps or DEFAULT_NUM_STEPS[s.sampler](L, s.n_steps_each)


def for_network(net, config: presets.Config, **options) -> Sampler:
    """The sampler of `config.sampling` (sampler, num_steps and its settings) for a score
    network with `net(x, labels)`, `net.score(x, sigma)` and `net.sigmas`; `options` go to
    the sampler (trajectory_every, diagnostics, jit_compile, clip, ...)."""
    s = config.sampling
    if s.sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {s.sampler!r}; expected one of "
                         f"{', '.join(SAMPLERS)}")
    if s.sampler == "ald":
        return AnnealedLangevin.from_config(lambda x, labels: net(x, labels, training=False),
                                            net.sigmas, config, **options)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    table = net.sigmas.numpy()
    return SAMPLERS[s.sampler](net.score, float(table[0]), float(table[-1]), shape,
                               denoise=s.denoise, **settings(config), **options)


# The config fields each rule takes (beside `denoise`); ald's come from `from_config`.
SETTINGS = {"ald": ("n_steps_each", "step_lr"), "cas": ("num_steps", "step_lr"),
            "pc": ("num_steps", "corrector_steps", "snr"), "heun": ("num_steps", "rho", "churn",
                                                                    "s_noise"),
            "dpm": ("num_steps", "rho", "eta", "s_noise")}


def settings(config: presets.Config) -> dict:
    """The settings of the configured sampler, by name (num_steps resolved from its default)."""
    s = config.sampling
    return {name: num_steps(config) if name == "num_steps" else getattr(s, name)
            for name in SETTINGS[s.sampler]}


__all__ = ["AnnealedLangevin", "ConsistentAnnealed", "DEFAULT_NUM_STEPS", "DIAGNOSTICS",
           "DPMSolver", "HeunODE", "PredictorCorrector", "SAMPLERS", "SETTINGS", "Sampler",
           "ScoreFn", "for_network", "karras_sigmas", "num_steps", "settings",
           "write_diagnostics"]
