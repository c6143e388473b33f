"""Fast FID over the checkpoints of a run (the official `fast_fid`): few samples per
checkpoint, to choose one; results to TensorBoard and a CSV."""
from __future__ import annotations

import io
import csv
import os
from typing import Any

import tensorflow as tf
from absl import logging

from ncsn_tf.training import checkpoints
from ncsn_tf.evaluation import metrics
from ncsn_tf.evaluation.fid import Statistics
from ncsn_tf.evaluation.trained import load_checkpoint_model, model_fid_is
from ncsn_tf.evaluation.inception import FeatureNetwork


SWEEP_CSV_FIELDS = ("step", "fid", "inception_score", "num_samples", "network")
SWEEP_CSV = "fast_fid.csv"  # in the workdir
SWEEP_LOGDIR = os.path.join("tensorboard", "fast_fid")  # in the workdir


def fast_fid_sweep(workdir: str, feature_net: FeatureNetwork, ref_stats: Statistics | str, *,
                   num_samples: int = 1000, begin_step: int | None = None,
                   end_step: int | None = None, seed: int = 0, batch_size: int | None = None,
                   eval_batch_size: int = 250, splits: int = 10,
                   config_overrides: dict[str, Any] | None = None,
                   csv_path: str | None = None, log_dir: str | None = None
                   ) -> list[dict[str, Any]]:
    """FID and IS of `num_samples` EMA samples of every checkpoint with begin_step <= step <=
    end_step (the official `--fast_fid`: few samples, only to choose a checkpoint).

    Every checkpoint uses the same seeds. Results go to TensorBoard (`fast_fid/fid`,
    `fast_fid/inception_score` at each checkpoint's step) under `log_dir`, default
    WORKDIR/tensorboard/fast_fid, and to the CSV `csv_path` (SWEEP_CSV_FIELDS), default
    WORKDIR/fast_fid.csv, rewritten after every checkpoint. Returns the rows, by step.
    """
    selected = selected_checkpoints(workdir, begin_step, end_step)
    csv_path = csv_path or os.path.join(workdir, SWEEP_CSV)
    log_dir = log_dir or os.path.join(workdir, SWEEP_LOGDIR)
    if isinstance(ref_stats, str):
        ref_stats = metrics.load_statistics(ref_stats, network=feature_net.name)
    writer = tf.summary.create_file_writer(log_dir)
    model, rows = None, []
    for _, prefix in selected:
        try:
            if model is None:  # traces the sampler once; later weights go into its net
                model = load_checkpoint_model(prefix, config_overrides)
            else:
                loaded, _, model.step = checkpoints.load(
                    prefix, ema=True, precision=model.config.training.precision)
                for target, value in zip(model.net.weights, loaded.weights):
                    target.assign(value)
                model.source = prefix
        except checkpoints.UnreadableCheckpointError as e:
            logging.warning("Skipping %s: it cannot be read (%s).", prefix, e.detail)
            continue
        result = model_fid_is(model, feature_net, ref_stats, num_samples=num_samples,
                              batch_size=batch_size, seed=seed,
                              eval_batch_size=eval_batch_size, splits=splits)
        row = {"step": model.step, "fid": result["fid"],
               "inception_score": result["inception_score"],
               "num_samples": result["num_images"], "network": result["network"]}
        rows.append(row)
        with writer.as_default(step=model.step):
            tf.summary.scalar("fast_fid/fid", row["fid"])
            if row["inception_score"] is not None:
                tf.summary.scalar("fast_fid/inception_score", row["inception_score"])
        writer.flush()
        _write_csv(csv_path, rows)
        logging.info("fast FID: step %d  FID %.3f  IS %s  (%s)", model.step, row["fid"],
                     row["inception_score"], prefix)
    writer.close()
    if not rows:
        raise checkpoints.CheckpointError(f"None of the {len(selected)} checkpoints of "
                                          f"{workdir} could be read; see the warnings above.")
    best = min(rows, key=lambda r: r["fid"])
    logging.info("Best fast FID: %.3f at step %d (%d samples per checkpoint; %s, %s)",
                 best["fid"], best["step"], num_samples, csv_path, log_dir)
    return rows


def selected_checkpoints(workdir: str, begin_step: int | None,
                          end_step: int | None) -> list[tuple[int, str]]:
    selected = checkpoints.checkpoint_prefixes(workdir, begin_step, end_step)
    if not selected:
        steps = [step for step, _ in checkpoints.checkpoint_prefixes(workdir)]
        raise FileNotFoundError(
            f"No checkpoint in {checkpoints.checkpoint_dir(workdir)} with step in "
            f"[{begin_step}, {end_step}]; steps there: {steps or 'none'}.")
    return selected


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    buffer = io.StringIO()
    out = csv.DictWriter(buffer, fieldnames=SWEEP_CSV_FIELDS)
    out.writeheader()
    out.writerows(rows)
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(buffer.getvalue())
