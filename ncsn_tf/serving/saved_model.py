"""A SavedModel of a score network for TF Serving: `export` writes the signatures of
`ServingModule` as the next version under a base path (`versions`), with its metadata.

Metadata: `assets.extra/ncsn_metadata.yaml` (training step, checkpoint, sampler name, NFE
and settings, bounds, signatures and the full training config), the same without the config
from the `sampler_settings` signature, and the variable `step` of the loaded object.
"""
from __future__ import annotations

import json
import os
from typing import Any

import keras
import tensorflow as tf
import yaml
from absl import logging

from ncsn_tf.config import presets
from ncsn_tf.serving import versions
from ncsn_tf.serving.signatures import SIGNATURES, ServingLimits, ServingModule

METADATA_FILE = os.path.join("assets.extra", "ncsn_metadata.yaml")


def export(net: keras.Model, config: presets.Config, step: int, base_path: str,
           model_name: str, *, limits: ServingLimits = ServingLimits(),
           checkpoint: str | None = None, extra_files: dict[str, str] | None = None) -> str:
    """Exports `net` (use the EMA network) as `base_path/model_name/<next version>`.

    `serving_default` samples as `config.sampling` says; `extra_files` maps paths
    inside the version (e.g. under `assets.extra/`) to text written before the version
    appears. Returns the version directory. Raises ValueError for settings out of bounds or
    a bad model name.
    """
    versions.check_model_name(model_name)
    if config.sampling.data_init:
        raise ValueError(
            "the config samples with data_init (starting from held-out images perturbed by "
            "sigma_1), which a SavedModel cannot do: its requests carry seeds, not images. "
            "Pass --nodata_init to export sampling from uniform noise (the paper's setting).")
    module = ServingModule(net, config, step, limits)
    metadata = {"checkpoint": checkpoint, **json.loads(module.settings_json),
                "config": config.to_dict()}
    path = versions.save_version(
        lambda directory: _write(module, directory, metadata, extra_files or {}),
        os.path.join(base_path, model_name))
    logging.info("Exported step %d to %s (signatures: %s)", step, path, ", ".join(SIGNATURES))
    return path


def read_metadata(export_dir: str) -> dict[str, Any]:
    """The metadata an export wrote (step, checkpoint, sampler, bounds, config, ...)."""
    with tf.io.gfile.GFile(os.path.join(export_dir, METADATA_FILE)) as f:
        return yaml.safe_load(f)


def _write(module: ServingModule, export_dir: str, metadata: dict[str, Any],
           extra_files: dict[str, str]) -> None:
    tf.saved_model.save(module, export_dir, signatures=module.signature_functions())
    files = {METADATA_FILE: yaml.safe_dump(metadata, sort_keys=False), **extra_files}
    for rel, text in files.items():
        path = os.path.join(export_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
