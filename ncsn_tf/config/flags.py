"""Command-line flags for every config field, generated from the schema (`schema`).

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
from typing import Any

import yaml
from absl import flags, logging

from ncsn_tf.config import presets, schema


def config_fields() -> dict[str, tuple[str, type]]:
    """Every flat config field -> (section, Python type), in declaration order."""
    return {name: (section, schema.kind(name)) for name, (section, _) in schema.fields().items()}


def help_text(field: str) -> str:
    return schema.fields()[field][1].metadata["help"]


def define_field_flag(field: str, help_suffix: str, flag_values: flags.FlagValues,
                      prefix: str = "") -> None:
    """The flag of one config field: its help (+ `help_suffix`), type and choices, unset
    (None) by default so that a flag left out keeps the value of the layers below."""
    _define(schema.fields()[field][1], schema.kind(field), None,
            f"{prefix}{help_text(field)} {help_suffix}", flag_values)


def define_option_flags(cls: type, flag_values: flags.FlagValues) -> None:
    """One flag per field of the options dataclass `cls` (e.g. `schema.RunOptions`), with the
    field's default."""
    for declared in dataclasses.fields(cls):
        _define(declared, schema.field_type(cls, declared.name), declared.default,
                declared.metadata["help"], flag_values)


def options_from_flags(cls: type, flag_values: flags.FlagValues):
    """The `cls` options given by `define_option_flags`' flags (checked while parsing: their
    choices and closed ranges)."""
    return cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls)})


def _define(declared, kind: type, default: Any, help_str: str,
            flag_values: flags.FlagValues) -> None:
    allowed = schema.choices(declared)
    if allowed is not None and kind is str:
        flags.DEFINE_enum(declared.name, default, list(allowed), help_str,
                          flag_values=flag_values)
        return
    define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
              float: flags.DEFINE_float, str: flags.DEFINE_string}.get(kind)
    if define is None:
        raise TypeError(f"Setting {declared.name} has type {kind}, which has no flag type; "
                        "extend ncsn_tf.config.flags._define")
    if allowed is not None:
        help_str += f" One of {', '.join(map(str, allowed))}."
    bounds = {}
    if kind in (int, float) and default is not None:  # closed ends checked while parsing
        meta = declared.metadata
        if meta.get("min") is not None and not meta["min_open"]:
            bounds["lower_bound"] = meta["min"]
        if meta.get("max") is not None and not meta["max_open"]:
            bounds["upper_bound"] = meta["max"]
    define(declared.name, default, help_str, flag_values=flag_values, **bounds)


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
    for field, (section, _) in config_fields().items():
        define_field_flag(field, "Default: from the preset.", flag_values, prefix=f"[{section}] ")


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
    schema.validate(config)
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
