"""Evaluator's work: FID (and IS) of the EMA model's samples against the eval split, and the
blessing that decides whether the Pusher may serve the model.

Samples are drawn with the trained config's sampler and its settings from seeds
0 … num_samples − 1, so a re-evaluation of the same model reproduces them.
The reference statistics are those of every image of the Examples' eval split under the same
feature network. A model is blessed when its FID is finite, at most `fid_threshold` (if one is
set) and no worse than the FID recorded with the last pushed version (if that was measured
the same way: same feature network, number of samples and reference images).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np
import tensorflow as tf

from pipelines import example_gen
from pipelines.pusher import PushedModel

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.png"
REFERENCE_STATISTICS_FILE = "eval_statistics.npz"
_GRID_IMAGES = 64
# What must match for two FIDs to be comparable.
_COMPARABLE = ("network", "num_samples", "reference")


def evaluate(model_dir: str, examples_dir: str, out_dir: str, *, feature_network: str,
             num_samples: int) -> dict[str, Any]:
    """FID/IS of `num_samples` EMA samples of the workdir `model_dir`; writes `out_dir`.

    `feature_network`: a spec of `ncsn_tf.evaluation.inception.load_feature_network` (tfgan, keras,
    random-test, ...); its name goes into the metrics. Returns the metrics.
    """
    from ncsn_tf import data, images
    from ncsn_tf.evaluation import inception, metrics
    from ncsn_tf import evaluation as fid

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for a covariance, got {num_samples}")
    feature_net = inception.load_feature_network(feature_network)  # fail before sampling
    model = fid.load_checkpoint_model(model_dir)
    samples = np.concatenate(list(fid.generate_samples(
        model.sample_fn, num_samples, model.config.sampling.sampling_batch_size)))

    reference = data.load(example_gen.read_config(examples_dir), "test", training=False,
                          batch_size=250)
    mu, sigma, num_reference = fid.dataset_statistics(reference, feature_net)
    # IS over 10 splits as published, but with at least 50 samples per split.
    splits = max(1, min(10, num_samples // 50))
    scores = fid.compute_fid_is(samples, feature_net, (mu, sigma), splits=splits)
    result = {
        "fid": scores["fid"],
        "inception_score": scores["inception_score"],
        "inception_score_std": scores["inception_score_std"],
        "inception_score_splits": splits,
        "num_samples": num_samples,
        "network": feature_net.name,
        "reference": {"split": "eval", "num_images": num_reference,
                      "source": example_gen.source_config(examples_dir).data.dataset},
        "step": model.step,
        "sampler": model.sampler,
    }
    tf.io.gfile.makedirs(out_dir)
    with tf.io.gfile.GFile(os.path.join(out_dir, METRICS_FILE), "w") as f:
        json.dump(result, f, indent=2)
    metrics.save_statistics(os.path.join(out_dir, REFERENCE_STATISTICS_FILE), mu, sigma,
                            network=feature_net.name, num_images=num_reference)
    images.save_image_grid(samples[:_GRID_IMAGES].astype(np.float32) / 255.0,
                             os.path.join(out_dir, SAMPLES_FILE))
    return result


def read_metrics(evaluation_dir: str) -> dict[str, Any]:
    """The metrics `evaluate` wrote to `evaluation_dir`."""
    with tf.io.gfile.GFile(os.path.join(evaluation_dir, METRICS_FILE)) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class Blessing:
    """Whether the model may be pushed, with one line per check that decided it."""
    blessed: bool
    reasons: list[str]
    baseline_version: int | None = None  # the pushed version compared with, if any
    baseline_fid: float | None = None


def bless(metrics: dict[str, Any], fid_threshold: float,
          baseline: PushedModel | None) -> Blessing:
    """Checks `metrics` against `fid_threshold` (<= 0: none) and the last pushed model."""
    fid = metrics["fid"]
    reasons, blessed = [], True
    if not math.isfinite(fid):
        return Blessing(False, [f"FID is {fid}: the samples are degenerate"])
    if fid_threshold > 0:
        passed = fid <= fid_threshold
        blessed &= passed
        reasons.append(f"FID {fid:.6g} {'<=' if passed else '>'} threshold {fid_threshold:g}")
    else:
        reasons.append("no FID threshold (fid_threshold <= 0)")
    if baseline is None:
        reasons.append("no pushed model to compare with")
        return Blessing(blessed, reasons)
    version = baseline.version
    if baseline.evaluation is None:
        reasons.append(f"pushed version {version} has no pipeline evaluation; not compared")
        return Blessing(blessed, reasons, version)
    different = [key for key in _COMPARABLE if baseline.evaluation.get(key) != metrics[key]]
    if different:
        reasons.append(f"pushed version {version} was evaluated differently "
                       f"({', '.join(different)}); not compared")
        return Blessing(blessed, reasons, version)
    baseline_fid = baseline.evaluation["fid"]
    passed = fid <= baseline_fid
    blessed &= passed
    reasons.append(f"FID {fid:.6g} {'<=' if passed else '>'} {baseline_fid:.6g} of pushed "
                   f"version {version}")
    return Blessing(blessed, reasons, version, baseline_fid)
