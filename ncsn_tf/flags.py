"""Command-line flags for every config field, generated from the dataclasses in `presets`.

Every CLI that takes a config (train, sample, export, ...) calls `define_config_flags()` once
at import and `config_from_flags()` in `main`. A config is resolved in three layers, later
ones winning:

1. a preset (`--preset`, else the preset that matches `--dataset`, else the one whose
   image size matches `--image_size`, for `folder:`/`tfrecord:` data),
2. a YAML file (`--config`, the nested layout of `Config.to_dict()`, e.g. a run's own
   `WORKDIR/config.yaml`; partial files are fine),
3. one flag per config field (`--batch_size`, `--sigma_begin`, ...); a flag left unset keeps
   the value from the layers below.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml
from absl import flags, logging

from ncsn_tf import presets

# Help for every config field; `define_config_flags` refuses to define a flag without one.
HELP: dict[str, str] = {
    # data
    "dataset": "What to train on: a TFDS name (cifar10, celeb_a, lsun/bedroom, mnist, ...), "
               "'digits' (scikit-learn's bundled digits, offline), 'folder:PATH' (a tree of "
               "PNG/JPEG images) or 'tfrecord:GLOB' (tf.train.Examples with an encoded image "
               "under 'image' or 'image/encoded', or FFHQ-style 'shape' + raw 'data').",
    "image_size": "Training resolution in pixels (square). For folder:/tfrecord: data without "
                  "--preset it also picks the preset with this resolution.",
    "channels": "Image channels: 1 (grayscale) or 3 (RGB).",
    "random_flip": "Random horizontal flips of training images.",
    "uniform_dequantization": "Add U[0, 1/256) noise to the 8-bit pixel values.",
    "data_dir": "TFDS data directory (where `tfds` finds or downloads datasets).",
    # model
    "arch": "Score network: auto (by resolution: <=64 px NCSNv2, 96-128 px NCSNv2Deeper, "
            "256 px NCSNv2Deepest), ncsnv2, ncsnv2_deeper or ncsnv2_deepest.",
    "ngf": "Base number of feature maps of the score network (128 in the paper).",
    "num_scales": "Number of noise levels L (Technique 2).",
    "sigma_begin": "Largest noise level sigma_1, about the largest pairwise distance between "
                   "training images (Technique 1; see `python -m ncsn_tf.configure`).",
    "sigma_end": "Smallest noise level sigma_L.",
    "sigma_dist": "Spacing of the noise levels: geometric (the paper) or uniform.",
    "ema_rate": "Exponential moving average rate of the weights (Technique 5).",
    # optim
    "lr": "Adam learning rate.",
    "beta1": "Adam beta_1.",
    "beta2": "Adam beta_2.",
    "adam_eps": "Adam epsilon, added after bias correction as in PyTorch (FFHQ uses 1e-3).",
    "weight_decay": "L2 weight decay added to the gradients (PyTorch Adam semantics).",
    "grad_clip": "Clip gradients to this global norm; 0 disables clipping.",
    # training
    "batch_size": "Global batch size, split evenly across all replicas (all workers).",
    "n_iters": "Total number of training steps; a resumed run stops at the same step.",
    "snapshot_freq": "Save a checkpoint (and a sample grid) every this many steps.",
    "keep_ema_snapshots": "Keep the EMA weights of every snapshot (checkpoints/ema/, about a "
                          "quarter of a full checkpoint each) for checkpoint sweeps; off keeps "
                          "only the last few and the keep_every ones.",
    "keep_every": "Keep the checkpoints of every multiple of this many steps forever, besides "
                  "the last few.",
    "test_freq": "Evaluate the EMA weights' DSM loss on one held-out batch every this many "
                 "steps; 0 disables it.",
    "log_freq": "Log a progress line and TensorBoard scalars every this many steps.",
    "anneal_power": "The DSM loss at level sigma is weighted by sigma**anneal_power.",
    "snapshot_sampling": "Draw a grid of EMA samples at every snapshot (TensorBoard and "
                         "WORKDIR/samples/).",
    "precision": "Compute precision: fp32, bf16 (mixed bfloat16) or fp16 (mixed float16 with "
                 "loss scaling). Weights and the EMA stay in float32.",
    "seed": "Random seed of the noise, the initial weights and the data order.",
    # sampling
    "sampling_batch_size": "Number of images drawn per sampling batch.",
    "n_steps_each": "Langevin steps per noise level (T in Algorithm 1).",
    "step_lr": "Langevin step size epsilon (Technique 4).",
    "denoise": "Finish sampling with one denoising step x + sigma_L^2 * s(x, sigma_L).",
    "data_init": "Start sampling from perturbed data instead of uniform noise.",
    "sampler": "Sampling algorithm: ald (annealed Langevin, the paper's; L*T score "
               "evaluations), cas (consistent annealed sampling), pc (predictor-corrector of "
               "the VE SDE), heun (probability-flow ODE, Heun's method) or dpm (second-order "
               "multistep SDE solver, DPM-Solver++(2M)-style). See the README.",
    "num_steps": "Noise levels of the cas/pc/heun/dpm samplers (0: the sampler's default, see "
                 "the README); ald always walks the L levels of the table.",
    "corrector_steps": "pc: Langevin corrector steps per level (NFE = num_steps * (1 + this)).",
    "snr": "pc: signal-to-noise ratio r of the corrector's step size 2 (r |z| / |score|)^2.",
    "rho": "heun, dpm: spacing of the sigma schedule (7 as Karras et al.; larger = denser near "
           "sigma_L).",
    "churn": "heun: stochastic churn S_churn (0: the deterministic ODE).",
    "eta": "dpm: noise of the SDE solver, eta (0: the deterministic probability-flow ODE).",
    "s_noise": "dpm: scale of the injected noise (below 1: lower temperature, higher "
               "precision, lower recall).",
}

# Fields whose values come from a fixed set; the flag rejects anything else at parse time.
CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ("auto", "ncsnv2", "ncsnv2_deeper", "ncsnv2_deepest"),
    "sigma_dist": ("geometric", "uniform"),
    "precision": ("fp32", "bf16", "fp16"),
    "sampler": ("ald", "cas", "pc", "heun", "dpm"),
}

# Lower bounds: (bound, inclusive). Checked after all layers are merged (`validate`).
_MINIMUM: dict[str, tuple[float, bool]] = {
    "image_size": (1, True), "channels": (1, True), "ngf": (1, True), "num_scales": (2, True),
    "sigma_begin": (0, False), "sigma_end": (0, False), "ema_rate": (0, True),
    "lr": (0, False), "beta1": (0, True), "beta2": (0, True), "adam_eps": (0, False),
    "weight_decay": (0, True), "grad_clip": (0, True),
    "batch_size": (1, True), "n_iters": (1, True), "snapshot_freq": (1, True),
    "keep_every": (0, True), "test_freq": (0, True), "log_freq": (1, True),
    "sampling_batch_size": (1, True), "n_steps_each": (1, True), "step_lr": (0, False),
    "num_steps": (0, True), "corrector_steps": (0, True), "snr": (0, False), "rho": (0, False),
    "churn": (0, True), "eta": (0, True), "s_noise": (0, True),
}
_BELOW_ONE = ("ema_rate", "beta1", "beta2")


def config_fields() -> dict[str, tuple[str, type]]:
    """Every flat config field -> (section, Python type), in declaration order."""
    out = {}
    for section in presets.SECTIONS:
        cls = type(getattr(presets.Config(), section))
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kind = hints[field.name]
            if typing.get_origin(kind) in (typing.Union, types.UnionType):
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            out[field.name] = (section, kind)
    return out


def define_config_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--preset`, `--config` and one flag per config field (default: keep)."""
    if "preset" in flag_values:
        return  # already defined by another module of the same program
    flags.DEFINE_enum("preset", None, presets.names(),
                      "Preset to start from (paper/official settings). Default: the preset of "
                      "--dataset, or for folder:/tfrecord: data the one matching --image_size.",
                      flag_values=flag_values)
    flags.DEFINE_string("config", None,
                        "YAML file of config overrides in the nested layout of a run's "
                        "config.yaml (sections data/model/optim/training/sampling). Applied "
                        "over the preset; flags are applied over it.", flag_values=flag_values)
    for field, (section, kind) in config_fields().items():
        if field not in HELP:
            raise KeyError(f"No help text for config field {section}.{field}: add it to "
                           "ncsn_tf.flags.HELP")
        help_text = f"[{section}] {HELP[field]} Default: from the preset."
        if field in CHOICES:
            flags.DEFINE_enum(field, None, list(CHOICES[field]), help_text,
                              flag_values=flag_values)
        elif kind is bool:
            flags.DEFINE_boolean(field, None, help_text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(field, None, help_text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(field, None, help_text, flag_values=flag_values)
        elif kind is str:
            flags.DEFINE_string(field, None, help_text, flag_values=flag_values)
        else:
            raise TypeError(f"Config field {section}.{field} has type {kind}, which has no flag "
                            "type; extend ncsn_tf.flags.define_config_flags")


def infer_preset(dataset: str | None, image_size: int | None = None) -> str:
    """The preset for a dataset name, or by resolution for `folder:`/`tfrecord:` data."""
    if dataset:
        if dataset in presets.names():
            return dataset
        for name in presets.names():
            if presets.get(name).data.dataset == dataset:
                return name
    if image_size:
        # Deterministic choice among presets of equal size (lsun_bedroom before lsun_tower).
        by_size = [n for n in presets.names() if presets.get(n).data.image_size == image_size]
        if by_size:
            name = by_size[0]
            logging.info("No preset given for dataset %r: using preset %r, the one for %d px. "
                         "Its noise levels fit its own data; derive sigma_begin/num_scales for "
                         "yours with `python -m ncsn_tf.configure`.", dataset, name, image_size)
            return name
    sizes = sorted({presets.get(n).data.image_size for n in presets.names()})
    raise ValueError(
        f"Cannot choose a preset for dataset {dataset!r}: pass --preset=NAME "
        f"(one of {', '.join(presets.names())}) or --image_size=N with N one of {sizes}, "
        "then override the rest by flags. `python -m ncsn_tf.configure` derives the noise "
        "levels for your data.")


def resolve_config(preset: str | None = None, config_file: str | None = None,
                   overrides: dict[str, Any] | None = None) -> presets.Config:
    """Preset < YAML file < flat overrides (None values are ignored); validated."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    from_file = read_yaml(config_file) if config_file else {}
    if preset is None and from_file.get("name") in presets.names():
        preset = from_file["name"]
    if preset is None:
        dataset = overrides.get("dataset", from_file.get("data", {}).get("dataset"))
        image_size = overrides.get("image_size", from_file.get("data", {}).get("image_size"))
        preset = infer_preset(dataset, image_size)
    merged = presets.get(preset).to_dict()
    for key, value in from_file.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    config = presets.Config.from_dict(merged)
    config = presets.override(config, **overrides)
    validate(config)
    return config


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> presets.Config:
    """The config given by `--preset`, `--config` and the per-field flags (parsed)."""
    overrides = {field: flag_values[field].value for field in config_fields()}
    return resolve_config(flag_values.preset, flag_values.config, overrides)


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases: a config never needs them, and a few hundred bytes
    of nested aliases expand to gigabytes (the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*name) are not allowed in a config file"
                                 f"{self.peek_event().start_mark}")
        return super().compose_node(parent, index)


_MAX_CONFIG_BYTES = 1 << 20


def read_yaml(path: str) -> dict[str, Any]:
    """A config file as a dict; a clear error for anything but a mapping of sections."""
    import tensorflow as tf  # gfile reads local paths and gs:// alike

    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"--config file {path} does not exist")
    if tf.io.gfile.isdir(path):
        raise ValueError(f"--config={path} is a directory; pass a YAML file such as "
                         f"{path.rstrip('/')}/config.yaml")
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ValueError(f"Config file {path} is over {_MAX_CONFIG_BYTES >> 20} MiB; a config "
                         "is a few hundred bytes of YAML. Is this the right file?")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_NoAliasLoader) or {}
    except UnicodeDecodeError as error:
        raise ValueError(f"Config file {path} is not UTF-8 text ({error.reason} at byte "
                         f"{error.start}); is it a YAML file?") from None
    except yaml.YAMLError as error:
        raise ValueError(f"Config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping such as 'training: "
                         f"{{batch_size: 64}}', not a {type(data).__name__}")
    for key, value in data.items():
        if key != "name" and not isinstance(value, dict):
            raise ValueError(f"Config file {path}: {key!r} must be one of the sections "
                             f"{presets.SECTIONS} holding a mapping of fields (or 'name').")
    return data


def validate(config: presets.Config) -> None:
    """Raises ValueError naming the flag for any value outside its valid range."""
    problems = []
    fields = config_fields()
    for field, (section, kind) in fields.items():
        value = getattr(getattr(config, section), field)
        if value is None and field == "data_dir":
            continue
        if kind in (int, float) and (isinstance(value, bool)
                                     or not isinstance(value, (int, float))):
            problems.append(f"--{field}={value!r} must be a number")
            continue
        if kind is int and isinstance(value, float):
            problems.append(f"--{field}={value!r} must be an integer")
            continue
        if kind is float and not math.isfinite(value):
            problems.append(f"--{field}={value!r} must be a finite number")
            continue
        if kind is bool and not isinstance(value, bool):
            problems.append(f"--{field}={value!r} must be true or false")
        if kind is str and not isinstance(value, str):
            problems.append(f"--{field}={value!r} must be a string")
        if field in CHOICES and value not in CHOICES[field]:
            problems.append(f"--{field}={value!r} must be one of {', '.join(CHOICES[field])}")
        if field in _MINIMUM and isinstance(value, (int, float)):
            bound, inclusive = _MINIMUM[field]
            if value < bound or (value == bound and not inclusive):
                problems.append(f"--{field}={value} must be {'>=' if inclusive else '>'} "
                                f"{bound}")
        if field in _BELOW_ONE and isinstance(value, (int, float)) and value >= 1:
            problems.append(f"--{field}={value} must be < 1")
    if config.data.channels not in (1, 3):
        problems.append(f"--channels={config.data.channels} must be 1 or 3")
    if (isinstance(config.model.sigma_begin, (int, float))
            and isinstance(config.model.sigma_end, (int, float))
            and config.model.sigma_begin <= config.model.sigma_end):
        problems.append(f"--sigma_begin={config.model.sigma_begin} must be larger than "
                        f"--sigma_end={config.model.sigma_end}")
    if problems:
        raise ValueError("Invalid config:\n  " + "\n  ".join(problems))
