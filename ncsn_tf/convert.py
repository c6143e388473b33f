"""Official NCSNv2 (ermongroup/ncsnv2, PyTorch) checkpoints and configs → ncsn_tf.

Library:
- `read_official_config(yml_path)`: an official YAML config (from `configs/` or the
  `config.yml` the official trainer writes beside its checkpoints) → `presets.Config`.
- `read_official_checkpoint(pth_path)`: the official training checkpoint
  `[state_dict, optimizer, epoch, step, ema_state]` → NumPy weights (`OfficialCheckpoint`).
- `read_official_step(pth_path)`: the training step stored in a checkpoint.
- `load_official_checkpoint(pth_path, yml_path, ema=True)`: a built Keras score network with
  the official (by default EMA) weights, and its config.
- `convert(pth_path, yml_path, output_dir, ema=True)`: writes an ncsn_tf workdir.

CLI: python -m ncsn_tf.convert --checkpoint=F.pth --config=F.yml --workdir=DIR [--no_ema]

Reading .pth files needs PyTorch (`pip install ncsn_tf[torch]`); it is imported only here and
only when a checkpoint is read. Checkpoints are unpickled with `weights_only=True`, so a file
cannot run code on load; both the zip format and the legacy format of PyTorch ≤1.5 (the
released checkpoints) are read.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import sys
from typing import Any, Mapping

import keras
import numpy as np
import yaml
from absl import app, flags, logging

from ncsn_tf import cli, models
from ncsn_tf.training import checkpoints
from ncsn_tf.config import presets
from ncsn_tf.models import RefineNetScore, layers

TORCH_INSTALL_HINT = "pip install torch==2.13.0 (or pip install ncsn_tf[torch])"


# ----------------------------------------------------------------------------- configs

class _OfficialConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load` plus the one Python tag the official trainer writes: its `config.yml` is
    a `yaml.dump` of nested `argparse.Namespace` objects, read here as plain dicts. Every other
    Python tag is still rejected, so no code runs on load."""


def _namespace_as_dict(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
    return loader.construct_mapping(node, deep=True)


_OfficialConfigLoader.add_constructor(
    "tag:yaml.org,2002:python/object:argparse.Namespace", _namespace_as_dict)

# Official `data.dataset` → our dataset name (LSUN adds its `category`).
_DATASETS = {"CIFAR10": "cifar10", "CELEBA": "celeb_a", "FFHQ": "ffhq", "MNIST": "mnist"}
# The official runner's `get_model` chooses the network by dataset, not by resolution.
_ARCH_BY_DATASET = {"CIFAR10": "ncsnv2", "CELEBA": "ncsnv2", "LSUN": "ncsnv2_deeper",
                    "FFHQ": "ncsnv2_deepest"}
# (official section, official key) → our flat field name.
_FIELDS = {
    ("data", "image_size"): "image_size",
    ("data", "channels"): "channels",
    ("data", "random_flip"): "random_flip",
    ("data", "uniform_dequantization"): "uniform_dequantization",
    ("model", "num_classes"): "num_scales",
    ("model", "sigma_begin"): "sigma_begin",
    ("model", "sigma_end"): "sigma_end",
    ("model", "sigma_dist"): "sigma_dist",
    ("model", "ngf"): "ngf",
    ("model", "ema_rate"): "ema_rate",
    ("optim", "lr"): "lr",
    ("optim", "beta1"): "beta1",
    ("optim", "eps"): "adam_eps",
    ("optim", "weight_decay"): "weight_decay",
    ("training", "batch_size"): "batch_size",
    ("training", "n_iters"): "n_iters",
    ("training", "snapshot_freq"): "snapshot_freq",
    ("training", "snapshot_sampling"): "snapshot_sampling",
    ("training", "anneal_power"): "anneal_power",
    ("sampling", "batch_size"): "sampling_batch_size",
    ("sampling", "n_steps_each"): "n_steps_each",
    ("sampling", "step_lr"): "step_lr",
    ("sampling", "denoise"): "denoise",
    ("sampling", "data_init"): "data_init",
}
_REQUIRED = [("data", "dataset"), ("data", "image_size"), ("data", "channels"),
             ("model", "num_classes"), ("model", "sigma_begin"), ("model", "sigma_end"),
             ("model", "ngf")]


def read_official_yaml(yml_path: str) -> dict[str, Any]:
    """The official config as nested dicts (plain YAML or the trainer's Namespace dump)."""
    with open(yml_path, encoding="utf-8") as f:
        try:
            tree = yaml.load(f, Loader=_OfficialConfigLoader)  # noqa: S506 (safe subclass)
        except yaml.constructor.ConstructorError as e:
            raise ValueError(
                f"{yml_path}: unsupported YAML tag ({e.problem}). Only plain YAML and "
                "!!python/object:argparse.Namespace (the official trainer's config.yml) are "
                "accepted; other Python tags are refused because they could run code.") from e
    if not isinstance(tree, dict):
        raise ValueError(f"{yml_path}: expected a mapping with sections data/model/optim/..., "
                         f"got {type(tree).__name__}")
    return tree


def official_to_config(tree: Mapping[str, Any]) -> presets.Config:
    """Maps an official config tree to a `presets.Config`.

    Starts from our preset for the same dataset (so fields the official YAML lacks, such as
    `keep_every`, keep that preset's values), then copies every official setting over. The
    architecture follows the official runner (by dataset); `load_official_checkpoint` and
    `convert` replace it with the one the checkpoint's weights belong to.
    """
    for section, key in _REQUIRED:
        if key not in (tree.get(section) or {}):
            raise ValueError(f"Official config lacks {section}.{key}")
    data, model = tree["data"], tree["model"]
    unsupported = {
        "data.logit_transform": data.get("logit_transform", False),
        "data.rescaled": data.get("rescaled", False),
        "model.spec_norm": model.get("spec_norm", False),
        "model.normalization != InstanceNorm++":
            model.get("normalization", "InstanceNorm++") != "InstanceNorm++",
        "model.nonlinearity != elu": str(model.get("nonlinearity", "elu")).lower() != "elu",
    }
    if any(unsupported.values()):
        raise ValueError("Unsupported official network options: "
                         f"{', '.join(k for k, v in unsupported.items() if v)}. ncsn_tf builds "
                         "the NCSNv2 networks (InstanceNorm++, ELU, input 2x-1) only.")
    optim = tree.get("optim") or {}
    if optim.get("optimizer", "Adam") != "Adam" or optim.get("amsgrad", False):
        logging.warning("The official run used %s (amsgrad=%s); ncsn_tf resumes training with "
                        "Adam.", optim.get("optimizer"), optim.get("amsgrad"))

    official_dataset = str(data["dataset"]).upper()
    if official_dataset == "LSUN":
        if "category" not in data:
            raise ValueError("Official LSUN config lacks data.category (e.g. church_outdoor)")
        dataset = f"lsun/{data['category']}"
    else:
        dataset = _DATASETS.get(official_dataset, official_dataset.lower())
    name = dataset.replace("/", "_")
    config = presets.get(name) if name in presets.names() else presets.Config(name=name)
    config.data.dataset = dataset
    config.model.arch = _ARCH_BY_DATASET.get(official_dataset, "auto")
    values = {}
    for (section, key), field in _FIELDS.items():
        if key in (tree.get(section) or {}):
            default = getattr(getattr(config, presets.field_section(field)), field)
            values[field] = _coerce(tree[section][key], type(default), f"{section}.{key}")
    return presets.override(config, **values)


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _coerce(value: Any, kind: type, name: str) -> Any:
    """An official setting as our field's type (sigma_begin: 50 → 50.0), refusing what would
    change its meaning ('false' → True, ngf: 8.9 → 8)."""
    bad = ValueError(f"Official config {name}: {value!r} is not a valid {kind.__name__}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _BOOLEANS:
            return _BOOLEANS[str(value).strip().lower()]
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not number.is_integer():
            raise bad
        return int(number)
    if kind is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):
            raise bad
        return number
    return kind(value)


def read_official_config(yml_path: str) -> presets.Config:
    """An official YAML config file as a `presets.Config` (see `official_to_config`)."""
    return official_to_config(read_official_yaml(yml_path))


# ----------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass
class OfficialCheckpoint:
    """Weights of an official checkpoint as float32 NumPy arrays in PyTorch layout, keyed by
    official parameter names without the `module.` prefix. `state` includes the `sigmas`
    buffer; `ema` (the EMA shadow weights) is None when the run had EMA off."""
    state: dict[str, np.ndarray]
    ema: dict[str, np.ndarray] | None
    step: int
    epoch: int


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"Reading official PyTorch checkpoints needs torch: {TORCH_INSTALL_HINT}"
                          ) from e
    return torch


def _to_numpy(state: Mapping[str, Any], pth_path: str) -> dict[str, np.ndarray]:
    torch = _import_torch()
    wrong = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if wrong:
        raise ValueError(f"{pth_path}: not an official checkpoint: its state dict holds "
                         f"non-tensor values ({', '.join(map(str, wrong[:5]))})")
    out = {k.removeprefix("module."): v.detach().cpu().float().numpy()
           for k, v in state.items()}
    broken = [k for k, v in out.items() if not np.all(np.isfinite(v))]
    if broken:
        raise ValueError(f"{pth_path}: the weights hold NaN or Inf values ({', '.join(broken[:5])}"
                         f"{', …' if len(broken) > 5 else ''}); the run had diverged. Convert "
                         "an earlier checkpoint of it.")
    return out


def read_official_checkpoint(pth_path: str) -> OfficialCheckpoint:
    """Reads `[state_dict, optimizer, epoch, step(, ema_state)]` as written by the official
    trainer (any PyTorch version, including the legacy format of the released checkpoints)."""
    torch = _import_torch()
    if not os.path.isfile(pth_path):
        raise FileNotFoundError(f"--checkpoint={pth_path}: no such file (an official "
                                "checkpoint.pth or checkpoint_N.pth)")
    try:
        states = torch.load(pth_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) and "Unsupported global" in str(e):
            raise ValueError(
                f"{pth_path}: not loadable with weights_only=True (it holds objects other "
                "than tensors and plain containers, which could run code); it was not "
                "written by the official trainer") from None
        raise ValueError(f"{pth_path}: not a PyTorch checkpoint, or truncated or corrupt "
                         "(it does not unpickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{pth_path}: not a PyTorch checkpoint, or truncated or corrupt "
                         f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    if not (isinstance(states, (list, tuple)) and len(states) in (4, 5)
            and isinstance(states[0], Mapping)):
        raise ValueError(
            f"{pth_path}: expected the official training checkpoint, a list [state_dict, "
            f"optimizer, epoch, step, ema_state]; got {type(states).__name__}"
            + (f" of length {len(states)}" if isinstance(states, (list, tuple)) else ""))
    try:
        step, epoch = _coerce(states[3], int, "step"), _coerce(states[2], int, "epoch")
    except ValueError:
        raise ValueError(f"{pth_path}: its step and epoch ({states[3]!r}, {states[2]!r}) are "
                         "not integers; not an official training checkpoint") from None
    state = _to_numpy(states[0], pth_path)
    if "sigmas" not in state:
        raise ValueError(f"{pth_path}: its state dict lacks the `sigmas` buffer of an NCSNv2 "
                         "network; not an official NCSNv2 checkpoint")
    ema = _to_numpy(states[4], pth_path) if len(states) == 5 else None
    return OfficialCheckpoint(state=state, ema=ema, step=step, epoch=epoch)


def read_official_step(pth_path: str) -> int:
    """The training step stored in an official checkpoint (reads the whole file)."""
    return read_official_checkpoint(pth_path).step


def official_arch(state: Mapping[str, Any]) -> str:
    """Which NCSNv2 network a state dict belongs to, from the names of its blocks."""
    stages = {k.split(".", 1)[0] for k in state}
    return ("ncsnv2_deepest" if "res31" in stages else
            "ncsnv2_deeper" if "res5" in stages else "ncsnv2")


def _official_names(prefix: str, layer: Any) -> dict[str, keras.Variable]:
    """Official parameter name → Keras variable, for `layer` and everything inside it."""
    if isinstance(layer, keras.layers.Conv2D):
        names = {prefix + "weight": layer.kernel}
        if layer.use_bias:
            names[prefix + "bias"] = layer.bias
        return names
    if isinstance(layer, layers.InstanceNormPlus):
        return {prefix + "alpha": layer.alpha, prefix + "gamma": layer.gamma,
                prefix + "beta": layer.beta}
    children: list[tuple[str, Any]] = []
    if isinstance(layer, layers.ConvMeanPool):
        children = [("conv", layer.conv)]
    elif isinstance(layer, layers.ResidualBlock):
        children = [(n, getattr(layer, n)) for n in
                    ("normalize1", "conv1", "normalize2", "conv2", "shortcut")]
    elif isinstance(layer, layers.RCUBlock):
        children = [(f"{k // layer.n_stages + 1}_{k % layer.n_stages + 1}_conv", conv)
                    for k, conv in enumerate(layer.convs)]
    elif isinstance(layer, (layers.CRPBlock, layers.MSFBlock)):
        children = [(f"convs.{k}", conv) for k, conv in enumerate(layer.convs)]
    elif isinstance(layer, layers.RefineBlock):
        children = [(f"adapt_convs.{k}", rcu) for k, rcu in enumerate(layer.adapt_convs)]
        children += [("msf", layer.msf), ("crp", layer.crp), ("output_convs", layer.output_convs)]
    elif isinstance(layer, RefineNetScore):
        children = [("begin_conv", layer.begin_conv), ("normalizer", layer.normalizer),
                    ("end_conv", layer.end_conv)]
        for res, refine, *_ in layer.STAGES:
            children += [(f"{res}.{k}", block) for k, block in enumerate(getattr(layer, res))]
            children.append((refine, getattr(layer, refine)))
    else:
        raise TypeError(f"No official name mapping for {type(layer).__name__}")
    names = {}
    for name, child in children:
        if child is not None:
            names.update(_official_names(f"{prefix}{name}.", child))
    return names


def official_weight_map(net: keras.Model) -> dict[str, keras.Variable]:
    """Official parameter name (e.g. `res2.0.conv2.conv.weight`) → trainable Keras variable."""
    return _official_names("", net)


def assign_official_weights(net: keras.Model, weights: Mapping[str, np.ndarray]) -> None:
    """Copies official weights (PyTorch layout, unprefixed names) into a built network.

    Conv kernels go from OIHW to HWIO. An optional `sigmas` entry replaces the σ table. Every
    trainable weight must be given exactly once with the right shape; otherwise nothing is
    assigned and the error names all missing/unexpected keys and shape mismatches.
    """
    targets = official_weight_map(net)
    if "sigmas" in weights:
        targets["sigmas"] = net.sigmas
    missing = sorted(set(targets) - set(weights))
    unexpected = sorted(set(weights) - set(targets))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    values = {}
    for name, variable in targets.items():
        if name not in weights:
            continue
        value = np.asarray(weights[name], dtype=np.float32)
        layout = ""
        if value.ndim == 4:
            value, layout = value.transpose(2, 3, 1, 0), " (OIHW → HWIO)"
        if tuple(value.shape) != tuple(variable.shape):
            problems.append(f"{name}: checkpoint shape {value.shape}{layout} != model shape "
                            f"{tuple(variable.shape)}")
        values[name] = value
    if problems:
        raise ValueError(f"Official weights do not fit {type(net).__name__} "
                         f"(ngf={net.ngf}, channels={net.channels}): " + "; ".join(problems))
    for name, value in values.items():
        targets[name].assign(value)


def _build_with(config: presets.Config, weights: Mapping[str, np.ndarray],
                sigmas: np.ndarray) -> keras.Model:
    net = models.build(config)
    assign_official_weights(net, {**weights, "sigmas": sigmas})
    return net


def _config_for(ckpt: OfficialCheckpoint, yml_path: str) -> presets.Config:
    config = read_official_config(yml_path)
    config.model.arch = official_arch(ckpt.state)  # the weights decide, not the dataset name
    return config


def _ema_weights(ckpt: OfficialCheckpoint, pth_path: str) -> dict[str, np.ndarray]:
    if ckpt.ema is None:
        raise ValueError(f"{pth_path} has no EMA weights (the run had model.ema: false); "
                         "use ema=False / --no_ema for the live weights.")
    return ckpt.ema


def load_official_checkpoint(pth_path: str, yml_path: str,
                             ema: bool = True) -> tuple[keras.Model, presets.Config]:
    """A built float32 score network with the checkpoint's EMA weights (live ones if
    `ema=False`), and the run's config. The training step: `read_official_step(pth_path)`."""
    ckpt = read_official_checkpoint(pth_path)
    config = _config_for(ckpt, yml_path)
    weights = _ema_weights(ckpt, pth_path) if ema else ckpt.state
    return _build_with(config, weights, ckpt.state["sigmas"]), config


def convert(pth_path: str, yml_path: str, output_dir: str, ema: bool = True) -> presets.Config:
    """Writes an ncsn_tf workdir from an official checkpoint and returns its config.

    The workdir (`checkpoints.save_converted`): `config.yaml` and `checkpoints/ckpt-N`
    (N = the official step) holding `net` (live weights), `ema_net` (EMA weights) and `step`,
    ready for sampling, export, evaluation or resumed training. With `ema=False`, or when the
    run had no EMA (whose official EMA would start from the live weights), `ema_net` holds the
    live weights too, so sampling uses them.
    """
    ckpt = read_official_checkpoint(pth_path)
    config = _config_for(ckpt, yml_path)
    sigmas = ckpt.state["sigmas"]
    if ema and ckpt.ema is None:
        logging.warning("%s has no EMA weights; ema_net gets the live weights.", pth_path)
    net = _build_with(config, ckpt.state, sigmas)
    ema_net = _build_with(config, ckpt.ema if ema and ckpt.ema is not None else ckpt.state,
                          sigmas)
    path = checkpoints.save_converted(output_dir, config, net, ema_net, ckpt.step)
    logging.info("Wrote %s (%s, step %d) and its config.yaml", path, models.arch_name(config),
                 ckpt.step)
    return config


# ----------------------------------------------------------------------------- CLI

# Old spelling -> flag: accepted with a warning for one release.
DEPRECATED_FLAGS = {"output": "workdir", "no-ema": "no_ema"}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The CLI flags. Defined on demand, not at import, so importing this module defines none."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "Official checkpoint (.pth), e.g. checkpoint.pth "
                        "or checkpoint_300000.pth from an ermongroup/ncsnv2 run.", **fv)
    flags.DEFINE_string("config", None, "Official config of that run: its config.yml (written "
                        "beside the checkpoints) or the configs/*.yml it was trained with.", **fv)
    flags.DEFINE_string("workdir", None, "New ncsn_tf workdir to write (config.yaml and "
                        "checkpoints/), as `train` writes it.", **fv)
    flags.DEFINE_bool("no_ema", False, "Sample with the live weights instead of the EMA "
                      "weights: both are converted, and this puts the live ones in the EMA "
                      "slot too.", **fv)
    cli.define_deprecated_aliases(DEPRECATED_FLAGS, flag_values)
    flags.mark_flags_as_required(["checkpoint", "config", "workdir"], flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flag_values
    cli.warn_deprecated(DEPRECATED_FLAGS, f)
    try:
        convert(f.checkpoint, f.config, f.workdir, ema=not f.no_ema)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        sys.exit(f"convert: {e}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
