"""Pusher's work: a blessed model becomes the next version under TF Serving's model base path.

`push` exports the EMA weights with `ncsn_tf.serving.export` (signatures, metadata) with the
Evaluator's metrics as an extra file, `assets.extra/pipeline_evaluation.json`: the whole version
is staged and renamed at once, so a server polling `<serving_base>/<model_name>/` never sees a
model without its evaluation.
`latest` reads that record back: it is the baseline the next Evaluator compares with.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import tensorflow as tf

from ncsn_tf import serving

EVALUATION_FILE = os.path.join("assets.extra", "pipeline_evaluation.json")


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
    version = serving.next_version(model_dir) - 1
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
    from ncsn_tf.training import checkpoints

    serving.check_model_name(model_name)
    net, config, step = checkpoints.load(model_dir, ema=True)
    path = serving.export(net, config, step, serving_base, model_name, checkpoint=model_dir,
                         extra_files={EVALUATION_FILE: json.dumps(evaluation, indent=2)})
    return PushedModel(int(os.path.basename(path.rstrip("/"))), path, evaluation)
