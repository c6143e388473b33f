"""The config schema: one dataclass per section, each field declared once with its type,
default, help, choices and bounds (`setting`). Flags, YAML validation and error messages are
generated from it (`ncsn_tf.config.flags`).

Field names are unique across sections, so a flat flag such as `--batch_size=64` maps to
exactly one field (`field_section`, `override`). Choices that name an implementation come from
its registry (`Registry`), read when first needed, so this module imports nothing of ours.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import functools
import math
import types
import typing
from typing import Any


@dataclasses.dataclass(frozen=True)
class Registry:
    """The keys of `module.attribute` (a dict or tuple of names), plus `extra` names."""
    module: str
    attribute: str
    extra: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return self.extra + tuple(getattr(importlib.import_module(self.module), self.attribute))


def setting(default: Any, help: str, *, choices: tuple | Registry | None = None,
            min: float | None = None, min_open: bool = False, max: float | None = None,
            max_open: bool = False):
    """A config field: its default, help, allowed values and range (open or closed ends)."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=choices, min=min, min_open=min_open, max=max, max_open=max_open))


def choices(field: dataclasses.Field) -> tuple | None:
    """The allowed values of a field, registries resolved; None when any value of its type."""
    allowed = field.metadata.get("choices")
    return allowed.names() if isinstance(allowed, Registry) else allowed


def range_problem(field: dataclasses.Field, value: float) -> str | None:
    """Why `value` is outside the field's range (e.g. "must be > 0"), or None."""
    meta = field.metadata
    if meta.get("min") is not None and (value < meta["min"] or
                                        (meta["min_open"] and value == meta["min"])):
        return f"must be {'>' if meta['min_open'] else '>='} {meta['min']}"
    if meta.get("max") is not None and (value > meta["max"] or
                                        (meta["max_open"] and value == meta["max"])):
        return f"must be {'<' if meta['max_open'] else '<='} {meta['max']}"
    return None


@dataclasses.dataclass
class DataConfig:
    """What to train on."""
    dataset: str = setting(
        "cifar10", "What to train on: a TFDS name (cifar10, celeb_a, lsun/bedroom, mnist, ...), "
        "'digits' (scikit-learn's bundled digits, offline), 'folder:PATH' (a tree of PNG/JPEG "
        "images) or 'tfrecord:GLOB' (tf.train.Examples with an encoded image under 'image' or "
        "'image/encoded', or FFHQ-style 'shape' + raw 'data').")
    image_size: int = setting(
        32, "Training resolution in pixels (square). For folder:/tfrecord: data without "
        "--preset it also picks the preset with this resolution.", min=1)
    channels: int = setting(3, "Image channels: 1 (grayscale) or 3 (RGB).", choices=(1, 3))
    random_flip: bool = setting(True, "Random horizontal flips of training images.")
    uniform_dequantization: bool = setting(
        False, "Add U[0, 1/256) noise to the 8-bit pixel values.")
    data_dir: str | None = setting(
        None, "TFDS data directory (where `tfds` finds or downloads datasets).")


@dataclasses.dataclass
class ModelConfig:
    """Score network and noise scales."""
    arch: str = setting(
        "auto", "Score network: auto (by resolution: <=64 px NCSNv2, 96-128 px NCSNv2Deeper, "
        "256 px NCSNv2Deepest), ncsnv2, ncsnv2_deeper or ncsnv2_deepest.",
        choices=Registry("ncsn_tf.models", "ARCHITECTURES", extra=("auto",)))
    ngf: int = setting(128, "Base number of feature maps of the score network (128 in the "
                            "paper).", min=1)
    num_scales: int = setting(232, "Number of noise levels L (Technique 2; the official "
                                   "`num_classes`).", min=2)
    sigma_begin: float = setting(
        50.0, "Largest noise level sigma_1, about the largest pairwise distance between "
        "training images (Technique 1; see `python -m ncsn_tf.configure`).", min=0, min_open=True)
    sigma_end: float = setting(0.01, "Smallest noise level sigma_L.", min=0, min_open=True)
    sigma_dist: str = setting("geometric", "Spacing of the noise levels: geometric (the paper) "
                                           "or uniform.",
                              choices=Registry("ncsn_tf.noise", "SIGMA_DISTS"))
    ema_rate: float = setting(0.999, "Exponential moving average rate of the weights "
                                     "(Technique 5).", min=0, max=1, max_open=True)


@dataclasses.dataclass
class OptimConfig:
    """Adam with PyTorch semantics (ε added after bias correction), as the official trainer."""
    lr: float = setting(1e-4, "Adam learning rate.", min=0, min_open=True)
    beta1: float = setting(0.9, "Adam beta_1.", min=0, max=1, max_open=True)
    beta2: float = setting(0.999, "Adam beta_2.", min=0, max=1, max_open=True)
    adam_eps: float = setting(1e-8, "Adam epsilon, added after bias correction as in PyTorch "
                                    "(FFHQ uses 1e-3).", min=0, min_open=True)
    weight_decay: float = setting(0.0, "L2 weight decay added to the gradients (PyTorch Adam "
                                       "semantics).", min=0)
    grad_clip: float = setting(0.0, "Clip gradients to this global norm; 0 disables clipping.",
                               min=0)


@dataclasses.dataclass
class TrainingConfig:
    """The training loop: batches, steps, snapshots, logging, precision."""
    batch_size: int = setting(128, "Global batch size, split evenly across all replicas (all "
                                   "workers).", min=1)
    n_iters: int = setting(300001, "Total number of training steps; a resumed run stops at the "
                                   "same step.", min=1)
    snapshot_freq: int = setting(5000, "Save a checkpoint (and a sample grid) every this many "
                                       "steps.", min=1)
    keep_every: int = setting(50000, "Keep the checkpoints of every multiple of this many steps "
                                     "forever, besides the last few.", min=0)
    keep_ema_snapshots: bool = setting(
        True, "Keep the EMA weights of every snapshot (checkpoints/ema/, about a quarter of a "
        "full checkpoint each) for checkpoint sweeps; off keeps only the last few and the "
        "keep_every ones.")
    test_freq: int = setting(100, "Evaluate the EMA weights' DSM loss on one held-out batch "
                                  "every this many steps; 0 disables it.", min=0)
    log_freq: int = setting(50, "Log a progress line and TensorBoard scalars every this many "
                                "steps.", min=1)
    anneal_power: float = setting(2.0, "The DSM loss at level sigma is weighted by "
                                       "sigma**anneal_power.")
    snapshot_sampling: bool = setting(True, "Draw a grid of EMA samples at every snapshot "
                                            "(TensorBoard and WORKDIR/samples/).")
    precision: str = setting(
        "fp32", "Compute precision: fp32, bf16 (mixed bfloat16) or fp16 (mixed float16 with "
        "loss scaling). Weights and the EMA stay in float32.",
        choices=Registry("ncsn_tf.models", "PRECISION_POLICIES"))
    seed: int = setting(0, "Random seed of the noise, the initial weights and the data order.")


@dataclasses.dataclass
class SamplingConfig:
    """How to sample: the rule (`sampler`) and each rule's settings."""
    sampling_batch_size: int = setting(100, "Number of images drawn per sampling batch.", min=1)
    n_steps_each: int = setting(5, "ald, cas: Langevin steps per noise level (T in "
                                   "Algorithm 1).", min=1)
    step_lr: float = setting(6.2e-6, "ald, cas: Langevin step size epsilon (Technique 4).",
                             min=0, min_open=True)
    denoise: bool = setting(True, "Finish sampling with one denoising step "
                                  "x + sigma_L^2 * s(x, sigma_L).")
    data_init: bool = setting(False, "Start sampling from perturbed data instead of uniform "
                                     "noise.")
    sampler: str = setting(
        "ald", "Sampling algorithm: ald (annealed Langevin, the paper's; L*T score "
        "evaluations), cas (consistent annealed sampling), pc (predictor-corrector of the VE "
        "SDE), heun (probability-flow ODE, Heun's method) or dpm (second-order multistep SDE "
        "solver, DPM-Solver++(2M)-style). See the README.",
        choices=Registry("ncsn_tf.sampling", "SAMPLERS"))
    num_steps: int = setting(0, "Noise levels of the cas/pc/heun/dpm samplers (0: the "
                                "sampler's default, see the README); ald always walks the L "
                                "levels of the table.", min=0)
    corrector_steps: int = setting(1, "pc: Langevin corrector steps per level (NFE = num_steps "
                                      "* (1 + this)).", min=0)
    snr: float = setting(0.16, "pc: signal-to-noise ratio r of the corrector's step size "
                               "2 (r |z| / |score|)^2.", min=0, min_open=True)
    rho: float = setting(7.0, "heun, dpm: spacing of the sigma schedule (7 as Karras et al.; "
                              "larger = denser near sigma_L).", min=0, min_open=True)
    churn: float = setting(10.0, "heun: stochastic churn S_churn of Karras et al. (gamma = "
                                 "min(churn/N, sqrt(2) - 1) more noise before each step; 0: the "
                                 "deterministic probability-flow ODE, see the README).", min=0)
    eta: float = setting(1.5, "dpm: noise of the SDE solver, eta (0: the deterministic "
                              "probability-flow ODE).", min=0)
    s_noise: float = setting(0.8, "heun, dpm: scale of the injected noise (below 1: lower "
                                  "temperature, higher precision, lower recall).", min=0)


@dataclasses.dataclass
class Config:
    name: str = "cifar10"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Inverse of `to_dict`; missing keys keep their defaults, unknown keys are errors."""
        config = cls()
        for key, value in d.items():
            if key == "name":
                config.name = value
            elif key in SECTIONS:
                section = getattr(config, key)
                for field, v in (value or {}).items():
                    if field not in _field_names(section):
                        raise ValueError(f"Unknown config field {key}.{field}")
                    setattr(section, field, v)
            else:
                raise ValueError(f"Unknown config section {key!r}; expected one of {SECTIONS}")
        return config


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run a training job, as opposed to what to train (the config)."""
    strategy: str = setting(
        "mirrored", "mirrored: all local GPUs (or the CPU). multi_worker: "
        "MultiWorkerMirroredStrategy configured by TF_CONFIG. tpu: TPUStrategy (see --tpu). "
        "one_device: the first GPU or the CPU.",
        choices=Registry("ncsn_tf.training", "STRATEGIES"))
    tpu: str | None = setting(None, "TPU name or grpc:// address for --strategy=tpu ('local' "
                                    "on a TPU VM).")
    jit_compile: bool = setting(False, "Compile the training step with XLA (meant for "
                                       "GPUs/TPUs; about 0.6x the speed on CPU, see README "
                                       "Benchmarks).")
    snapshot_samples: int = setting(36, "Images in the sample grid drawn at every snapshot "
                                        "(0: none; see also --nosnapshot_sampling).", min=0)
    snapshot_num_scales: int = setting(
        100, "Noise levels of the short Langevin run at each snapshot: an evenly spread "
        "subset of the sigma table, with the Technique 4 step size for it; 0 uses every level "
        "(the official full run).", min=0)
    allow_config_change: bool = setting(False, "Resume a workdir even though the config "
                                               "changed in a way that alters training (batch "
                                               "size, lr, ...).")
    deterministic_data: bool = setting(False, "Reproducible input order (slower); always on "
                                              "for multi-worker training.")
    init_from: str | None = setting(
        None, "Fine-tune: start a new run (step 0, fresh optimizer) from the live and EMA "
        "weights of this workdir or checkpoint prefix, e.g. one written by ncsn_tf.convert from "
        "official weights. The architecture (arch, ngf, channels) must match; the noise levels, "
        "data and optimizer settings are this run's. Ignored, with a warning, when the workdir "
        "already holds a checkpoint to resume.")


SECTIONS = ("data", "model", "optim", "training", "sampling")


def _field_names(section) -> set[str]:
    return {f.name for f in dataclasses.fields(section)}


def fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every flat config field -> (section, its dataclass field), in declaration order."""
    config = Config()
    return {f.name: (s, f) for s in SECTIONS for f in dataclasses.fields(getattr(config, s))}


@functools.cache
def field_type(cls: type, name: str) -> type:
    """The Python type of field `name` of the dataclass `cls` (`str | None` -> str)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def kind(field: str) -> type:
    """The Python type of a flat config field (`str | None` -> str)."""
    section, _ = fields()[field]
    return field_type(type(getattr(Config(), section)), field)


def field_section(field: str) -> str:
    """The section that holds a flat field name, e.g. `batch_size` -> `training`."""
    try:
        return fields()[field][0]
    except KeyError:
        raise KeyError(f"Unknown config field {field!r}") from None


def override(config: Config, **values: Any) -> Config:
    """A copy of `config` with flat fields replaced, e.g. override(c, ngf=64, n_iters=10)."""
    config = copy.deepcopy(config)
    for field, value in values.items():
        setattr(getattr(config, field_section(field)), field, value)
    return config


def problems(settings: Any) -> list[str]:
    """What is wrong with the values of a dataclass of `setting` fields, one line per field
    naming its flag: type, finiteness, choices and range."""
    found = []
    for declared in dataclasses.fields(settings):
        field, value = declared.name, getattr(settings, declared.name)
        kind_of = field_type(type(settings), field)
        if value is None and declared.default is None:
            continue
        if kind_of in (int, float) and (isinstance(value, bool)
                                        or not isinstance(value, (int, float))):
            found.append(f"--{field}={value!r} must be a number")
            continue
        if kind_of is int and isinstance(value, float):
            found.append(f"--{field}={value!r} must be an integer")
            continue
        if kind_of is float and not math.isfinite(value):
            found.append(f"--{field}={value!r} must be a finite number")
            continue
        if kind_of is bool and not isinstance(value, bool):
            found.append(f"--{field}={value!r} must be true or false")
        if kind_of is str and not isinstance(value, str):
            found.append(f"--{field}={value!r} must be a string")
        allowed = choices(declared)
        if allowed is not None and value not in allowed:
            found.append(f"--{field}={value!r} must be one of {', '.join(map(str, allowed))}")
        if kind_of in (int, float) and isinstance(value, (int, float)):
            problem = range_problem(declared, value)
            if problem:
                found.append(f"--{field}={value} {problem}")
    return found


def validate(config: Config) -> None:
    """Raises ValueError naming the flag for any value outside its valid range."""
    found = [line for section in SECTIONS for line in problems(getattr(config, section))]
    if (isinstance(config.model.sigma_begin, (int, float))
            and isinstance(config.model.sigma_end, (int, float))
            and config.model.sigma_begin <= config.model.sigma_end):
        found.append(f"--sigma_begin={config.model.sigma_begin} must be larger than "
                     f"--sigma_end={config.model.sigma_end}")
    if found:
        raise ValueError("Invalid config:\n  " + "\n  ".join(found))
