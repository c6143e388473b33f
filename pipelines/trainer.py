"""Trainer's work: the training config from the Examples, the statistics and the overrides.

Precedence, later winning: the Examples' config (preset + image size/channels) < the noise
scales proposed from the statistics (σ1 measured; L and ε from Techniques 2 and 4 for the
final σL and T, so an overridden `sigma_end` or `n_steps_each` gets a matching proposal) <
the pipeline's overrides. Then `ncsn_tf.training.train` runs in the Model directory, which
becomes a regular training workdir (config.yaml, checkpoints/, tensorboard/, samples/).
"""
from __future__ import annotations

import os
import shutil
from typing import Any

from ncsn_tf import noise
from ncsn_tf.config import flags, presets, schema
from pipelines import example_gen, statistics_gen

# The data come from the Examples; these fields are set by ExampleGen's parameters.
DATA_FIELDS = ("dataset", "data_dir", "image_size", "channels")
TENSORBOARD_DIR = "tensorboard"


def training_config(examples_dir: str, statistics_dir: str, overrides: dict[str, Any], *,
                    use_proposed_noise: bool = True) -> tuple[presets.Config, dict[str, str]]:
    """The config to train with, and the source of each field set over the Examples' config
    ("proposed by StatisticsGen" or "pipeline override"), for the log."""
    fixed = sorted(set(overrides) & set(DATA_FIELDS))
    if fixed:
        raise ValueError(f"Config overrides {fixed} cannot change the data of a pipeline run: "
                         "set them with the pipeline parameters of ExampleGen (dataset, "
                         "data_dir, image_size, channels).")
    overrides = _typed(overrides)
    config = presets.override(example_gen.read_config(examples_dir), **overrides)
    sources = {}
    if use_proposed_noise:
        stats = statistics_gen.read(statistics_dir)
        m = config.model
        # Techniques 2 and 4 for the final table: the overridden fields stay as given.
        recommendation = noise.recommend(
            stats["dim"], m.sigma_begin if "sigma_begin" in overrides else stats["sigma_begin"],
            m.sigma_end, config.sampling.n_steps_each,
            num_scales=m.num_scales if "num_scales" in overrides else None)
        proposal = {field: value for field, value in recommendation.overrides().items()
                    if field in ("sigma_begin", "num_scales", "step_lr")
                    and field not in overrides}
        config = presets.override(config, **proposal)
        sources = {field: "proposed by StatisticsGen" for field in proposal}
    sources.update({field: "pipeline override" for field in overrides})
    schema.validate(config)
    return config, sources


def _typed(overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` with whole numbers of integer fields as ints: KFP passes a dict parameter
    as JSON, in which 5 and 5.0 are the same number."""
    fields = flags.config_fields()
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"Unknown config fields in the overrides: {unknown}")
    return {name: int(value) if (fields[name][1] is int and isinstance(value, float)
                                 and value.is_integer()) else value
            for name, value in overrides.items()}


def config_value(config: presets.Config, field: str) -> Any:
    """The value of a flat config field, e.g. config_value(config, "num_scales")."""
    return getattr(getattr(config, presets.field_section(field)), field)


def train(config: presets.Config, model_dir: str, tensorboard_dir: str | None = None) -> int:
    """Trains `config` in `model_dir`; returns the final step.

    With `tensorboard_dir`, the run's TensorBoard logs are copied there as well.
    """
    from ncsn_tf import training  # the model code loads only when training

    result = training.train(config, model_dir)
    if result.stop_signal is not None:
        raise RuntimeError(f"Training stopped by signal {result.stop_signal} at step "
                           f"{result.step} of {config.training.n_iters}.")
    logs = os.path.join(model_dir, TENSORBOARD_DIR)
    if tensorboard_dir and os.path.isdir(logs):
        shutil.copytree(logs, tensorboard_dir, dirs_exist_ok=True)
    return result.step
