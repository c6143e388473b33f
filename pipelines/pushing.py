"""Pusher's work: a blessed model becomes the next version under TF Serving's model base path.

`push` exports the EMA weights with `ncsn_tf.export` (signatures, metadata) and adds the
Evaluator's metrics as `assets.extra/pipeline_evaluation.json`, inside the version directory
and before it appears: the whole version is staged and renamed by `export.save_version`, so a
server polling `<serving_base>/<model_name>/` never sees a model without its evaluation.
`latest` reads that record back: it is the baseline the next Evaluator compares with.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import tensorflow as tf

from ncsn_tf import export

EVALUATION_FILE = os.path.join("assets.extra", "pipeline_evaluation.json")
_SCRATCH = ".export"  # inside the staging directory; non-numeric, so never taken for a version


@dataclasses.dataclass(frozen=True)
class PushedModel:
    """The highest version of a model, and the evaluation it was pushed with (None when it
    was exported some other way, e.g. by `python -m ncsn_tf.export`)."""
    version: int
    path: str
    evaluation: dict[str, Any] | None


def latest(serving_base: str, model_name: str) -> PushedModel | None:
    """The version TF Serving serves (the highest), or None when there is none yet."""
    model_dir = os.path.join(serving_base, model_name)
    version = export.next_version(model_dir) - 1
    if version < 1:
        return None
    path = os.path.join(model_dir, str(version))
    record = os.path.join(path, EVALUATION_FILE)
    evaluation = None
    if tf.io.gfile.exists(record):
        with tf.io.gfile.GFile(record) as f:
            evaluation = json.load(f)
    return PushedModel(version, path, evaluation)


def push(model_dir: str, serving_base: str, model_name: str,
         evaluation: dict[str, Any]) -> PushedModel:
    """Exports the EMA weights of the training workdir `model_dir` as the next version of
    `<serving_base>/<model_name>`, with `evaluation` recorded in it."""
    from ncsn_tf import checkpoints

    export.check_model_name(model_name)
    net, config, step = checkpoints.load(model_dir, ema=True)

    def write(directory: str) -> None:
        exported = export.export(net, config, step, directory, _SCRATCH, checkpoint=model_dir)
        for name in os.listdir(exported):
            os.rename(os.path.join(exported, name), os.path.join(directory, name))
        shutil.rmtree(os.path.join(directory, _SCRATCH))
        record = os.path.join(directory, EVALUATION_FILE)
        os.makedirs(os.path.dirname(record), exist_ok=True)
        with open(record, "w", encoding="utf-8") as f:
            json.dump(evaluation, f, indent=2)

    path = export.save_version(write, os.path.join(serving_base, model_name))
    return PushedModel(int(os.path.basename(path.rstrip("/"))), path, evaluation)
