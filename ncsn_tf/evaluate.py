r"""`python -m ncsn_tf.evaluate`: FID, Inception Score, precision/recall, KID and nearest
neighbours of generated samples, and a grid of the least realistic ones.

Samples come as an `.npz` file, a folder of images, an array, a `tf.data.Dataset`, any iterable
of batches, or are drawn on the fly from a trained model: a checkpoint (the EMA weights, with
the config's sampler or the one --sampler names) or an exported SavedModel (its
`serving_default` signature). Image i of a model comes from seed `seed + i`, so a run is
reproducible and gives the same images as `python -m ncsn_tf.sample` and TF Serving. Samples
are streamed through a `FeatureNetwork` (ncsn_tf.evaluation.inception), so memory stays
bounded. Reference statistics of a dataset are computed once and cached as an `.npz` (`mu`,
`sigma`: the TTUR layout, so published statistics files load too).

FID summarises a whole set, so a few broken samples barely move it. Whenever the reference
dataset is at hand (a model's own, or `--preset`/`--dataset` with `--samples`), evaluate also
reports improved precision and recall (k-NN manifolds, `--pr_k`), KID with its standard error,
and writes the `--num_worst` least realistic samples (lowest realism score) to `--worst_out`:
look at that grid first.

    python -m ncsn_tf.evaluate --samples=samples.npz --inception=tfgan:/models/inception \
        --preset=cifar10 --ref_stats=stats/cifar10_train.npz --nn_k=9
    python -m ncsn_tf.evaluate --workdir=runs/cifar10 --num_samples=50000 \
        --ref_stats=stats/cifar10_train.npz
    python -m ncsn_tf.evaluate --sweep_workdir=runs/cifar10 --num_samples=1000 \
        --ref_stats=stats/cifar10_train.npz     # fast FID of every checkpoint

The library behind it is `ncsn_tf.evaluation`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from ncsn_tf import cli, data, serving
from ncsn_tf.training import checkpoints
from ncsn_tf.evaluation import inception
from ncsn_tf.config import presets, flags as config_flags
from ncsn_tf import images as image_io
from ncsn_tf.evaluation import (SWEEP_CSV, SWEEP_LOGDIR, ManifoldMetrics, Statistics,
                                batches_of, compute_fid_is, fast_fid_sweep,
                                load_checkpoint_model, load_saved_model, model_fid_is,
                                nearest_neighbors, neighbor_grid, reference_features,
                                reference_statistics, save_samples)
from ncsn_tf.evaluation.sources import images_of
from ncsn_tf.evaluation.sweep import selected_checkpoints
from ncsn_tf.evaluation.inception import FeatureNetwork


FLAGS = flags.FLAGS
SOURCES = ("samples", "workdir", "checkpoint", "saved_model", "sweep_workdir")
_MODELS = ("workdir", "checkpoint", "saved_model")
# Flags that only some sources use.
_ONLY_WITH = {
    "preset": ("samples",), "config": ("samples",), "max_images": ("samples",),
    "num_samples": (*_MODELS, "sweep_workdir"), "save_samples": _MODELS,
    "nn_k": ("samples", *_MODELS), "worst_out": ("samples", *_MODELS),
    "begin_step": ("sweep_workdir",), "end_step": ("sweep_workdir",),
    "fast_fid_csv": ("sweep_workdir",), "fast_fid_logdir": ("sweep_workdir",),
}
DEFAULT_NUM_SAMPLES = {"model": 50_000, "sweep": 1_000}


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The CLI's flags; defined on demand so that importing this module defines none.

    The reference dataset is a config: the model's own for a model, else `--preset`,
    `--dataset`, `--data_dir`, ... (see ncsn_tf.config.flags). Of the config flags, `--seed` is the
    first sample seed and the sampling ones (`--n_steps_each`, `--step_lr`, `--denoise`,
    `--sampling_batch_size`) change how a model samples.
    """
    fv = dict(flag_values=flag_values)
    config_flags.define_config_flags(flag_values)
    for field in (*cli.SAMPLER_FIELDS, "sampling_batch_size", "seed", "preset", "dataset",
                  "data_dir"):
        flags.declare_key_flag(field, flag_values=flag_values)  # listed by --help
    flags.DEFINE_string("samples", None, "Samples: an .npz (key 'samples' or its first array; "
                        "uint8 or float in [0,1], NHWC or NCHW) or a folder of images.", **fv)
    cli.define_model_source_flags(flag_values, "sampled (its EMA weights)", weights=False)
    for name in ("workdir", "checkpoint"):
        flags.declare_key_flag(name, flag_values=flag_values)  # listed by --help
    flags.DEFINE_string("saved_model", None, "Draw the samples from this export of "
                        "ncsn_tf.export (a version directory, e.g. saved_models/ncsn/1).", **fv)
    flags.DEFINE_string("sweep_workdir", None, "Fast FID: FID/IS of --num_samples samples "
                        "(default 1000) of every checkpoint of this workdir, to pick the best "
                        "one; to TensorBoard and a CSV.", **fv)
    flags.DEFINE_integer("num_samples", None, "Images to draw from the model: default 50000 "
                         "(the published protocol), 1000 with --sweep_workdir. Image i uses "
                         "seed --seed + i (default 0), as ncsn_tf.sample and TF Serving.", **fv)
    flags.DEFINE_string("save_samples", None, "Also save the drawn images (uint8 'samples' and "
                        "their 'seeds') in this .npz.", **fv)
    flags.DEFINE_integer("begin_step", None, "--sweep_workdir: first step to evaluate.", **fv)
    flags.DEFINE_integer("end_step", None, "--sweep_workdir: last step to evaluate.", **fv)
    flags.DEFINE_string("fast_fid_csv", None, "--sweep_workdir: the CSV (step, fid, "
                        "inception_score, num_samples, network). Default WORKDIR/fast_fid.csv.",
                        **fv)
    flags.DEFINE_string("fast_fid_logdir", None, "--sweep_workdir: TensorBoard directory. "
                        "Default WORKDIR/tensorboard/fast_fid.", **fv)
    flags.DEFINE_string("inception", "tfgan", f"Feature network: {inception.SPECS}. tfgan is the "
                        "standard FID network; random-test is for tests only.", **fv)
    flags.DEFINE_string("ref_stats", None, "Reference statistics .npz (mu, sigma; e.g. TTUR's "
                        "fid_stats_cifar10_train.npz). If missing, computed from the dataset of "
                        "the model's config or --preset/--dataset, and saved there.", **fv)
    flags.DEFINE_string("split", "train", "Reference split.", **fv)
    flags.DEFINE_integer("eval_batch_size", 250, "Images per feature-network batch.", **fv)
    flags.DEFINE_integer("max_images", None, "--samples: use at most this many.", **fv)
    flags.DEFINE_integer("max_ref_images", None, "Use at most this many reference images.",
                         **fv)
    flags.DEFINE_integer("splits", 10, "Inception Score splits (10 as published; 1 as TF-GAN).",
                         **fv)
    flags.DEFINE_integer("nn_k", 0, "Nearest neighbours per sample (0: skip).", **fv)
    flags.DEFINE_integer("nn_samples", 10, "Samples to find nearest neighbours for.", **fv)
    flags.DEFINE_enum("nn_space", "pixels", ["pixels", "features"], "Distance for neighbours.",
                      **fv)
    flags.DEFINE_bool("nn_flip", True, "Also match the mirrored sample, as the official code.",
                      **fv)
    flags.DEFINE_string("nn_out", "nearest_neighbors.png", "PNG grid of neighbours.", **fv)
    flags.DEFINE_bool("precision_recall", True, "Also compute improved precision and recall, "
                      "KID and per-sample realism against the reference dataset's features "
                      "(needs the dataset, not only --ref_stats), and write the least "
                      "realistic samples to --worst_out.", **fv)
    flags.DEFINE_integer("pr_k", 3, "Neighbours of the k-NN manifolds of precision/recall.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("max_pr_images", 10_000, "Reference images and samples (the first "
                         "ones) whose features enter precision, recall and KID; realism is "
                         "computed for every sample.", lower_bound=4, **fv)
    flags.DEFINE_integer("num_worst", 32, "Least realistic samples in the --worst_out grid.",
                         lower_bound=1, **fv)
    flags.DEFINE_string("worst_out", None, "PNG grid of the least realistic samples, least "
                        "realistic first. Default: beside --report (REPORT_worst.png), else "
                        "worst_samples.png.", **fv)
    flags.DEFINE_string("report", None, "Also write the results as JSON here.", **fv)
    flags.DEFINE_string("cache_dir", None, "Where downloaded networks are kept (default "
                        "$NCSN_TF_CACHE or ~/.cache/ncsn_tf).", **fv)


def main(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """Prints the results as one JSON line (and writes them to --report)."""
    f = flag_values
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    given = [name for name in SOURCES if f[name].value]
    if len(given) != 1:
        raise app.UsageError("Give exactly one of --samples (an .npz or a folder of images), "
                             "--workdir or --checkpoint (a trained model), --saved_model (an "
                             "export), --sweep_workdir (fast FID of every checkpoint).")
    for name, sources in _ONLY_WITH.items():
        if f[name].value and given[0] not in sources:
            hint = (" A model brings its own config; change single fields by flags, e.g. "
                    "--data_dir." if name in ("preset", "config") else "")
            raise app.UsageError(f"--{name} goes only with "
                                 f"{' or '.join('--' + s for s in sources)}.{hint}")
    if f.num_samples is not None and f.num_samples < 2:
        raise app.UsageError(f"--num_samples={f.num_samples} must be >= 2 (for a covariance).")
    try:
        if f.samples:
            results = _evaluate_samples(f)
        elif f.sweep_workdir:
            results = _sweep(f)
        else:
            results = _evaluate_model(f)
    except (FileNotFoundError, ValueError, inception.FeatureNetworkUnavailable,
            tf.errors.InvalidArgumentError) as e:
        raise SystemExit(f"evaluate: {e}") from None
    line = json.dumps(results)
    print(line)
    if f.report:
        with tf.io.gfile.GFile(f.report, "w") as out:
            out.write(line + "\n")


def _config_overrides(f) -> dict[str, Any]:
    """The config fields given by flags; `--seed` is the first sample seed, not a field."""
    return {field: f[field].value for field in config_flags.config_fields()
            if field != "seed" and f[field].value is not None}


def _reference(f, config: presets.Config, feature_net: FeatureNetwork
               ) -> tuple[Statistics | str, str]:
    """(statistics or their file, what they describe) for the FID."""
    if f.ref_stats and tf.io.gfile.exists(f.ref_stats):
        return f.ref_stats, f.ref_stats  # any layout load_statistics reads, e.g. TTUR's
    stats = reference_statistics(config, feature_net, f.ref_stats, split=f.split,
                                 batch_size=f.eval_batch_size, max_images=f.max_ref_images)
    return stats, f.ref_stats or f"{config.data.dataset}/{f.split}"


def _manifold(f, config: presets.Config | None, feature_net: FeatureNetwork
              ) -> ManifoldMetrics | None:
    """Precision/recall/KID/realism against the reference dataset's features, when asked for
    and the dataset is known (a statistics file alone holds no features)."""
    if not f.precision_recall:
        return None
    if config is None:
        logging.info("Precision, recall and KID skipped: they need the reference images' "
                     "features; pass --preset or --dataset as well as --ref_stats.")
        return None
    reference = reference_features(config, feature_net, split=f.split,
                                   batch_size=f.eval_batch_size,
                                   max_images=min(f.max_pr_images, f.max_ref_images
                                                  or f.max_pr_images))
    if len(reference) <= f.pr_k:
        raise ValueError(f"Precision/recall with --pr_k={f.pr_k} needs more than {f.pr_k} "
                         f"reference images; the reference set has {len(reference)}.")
    return ManifoldMetrics(reference, k=f.pr_k, max_samples=f.max_pr_images,
                           num_worst=f.num_worst)


def _save_worst(f, manifold: ManifoldMetrics | None, results: dict[str, Any]) -> None:
    """Writes the least realistic samples' grid and records where."""
    if manifold is None or not manifold.count:
        return
    path = f.worst_out or (os.path.splitext(f.report)[0] + "_worst.png" if f.report
                           else "worst_samples.png")
    worst = manifold.worst_images()
    image_io.save_image_grid(worst / 255.0 if worst.dtype == np.uint8 else worst, path,
                             ncol=min(8, len(worst)))
    results["least_realistic"]["png"] = path


def _neighbors(f, samples: np.ndarray, config: presets.Config,
               feature_net: FeatureNetwork) -> dict[str, Any]:
    train = data.load(config, f.split, training=False, batch_size=f.eval_batch_size)
    found = nearest_neighbors(samples, train, f.nn_k, flip=f.nn_flip,
                              feature_net=feature_net if f.nn_space == "features" else None)
    image_io.save_png(f.nn_out, neighbor_grid(samples, found.images))
    return {"png": f.nn_out, "space": found.space,
            "min_distance": float(found.distances[:, 0].min())}


def _evaluate_samples(f) -> dict[str, Any]:
    with_reference = bool(f.ref_stats or f.preset or f.dataset)
    if not (with_reference or f.nn_k):
        raise app.UsageError("Nothing to do: pass --ref_stats and/or --preset (or --dataset) "
                             "for FID and IS, --nn_k with --preset for nearest neighbours.")
    feature_net = inception.load_feature_network(f.inception, cache_dir=f.cache_dir)
    results: dict[str, Any] = {"samples": f.samples}
    config = None
    if with_reference:
        if not (f.ref_stats and tf.io.gfile.exists(f.ref_stats)):
            config = config_flags.config_from_flags(f)
        ref_stats, reference = _reference(f, config, feature_net)
        manifold = _manifold(f, config, feature_net)
        results.update(compute_fid_is(f.samples, feature_net, ref_stats,
                                      batch_size=f.eval_batch_size, max_images=f.max_images,
                                      splits=f.splits, manifold=manifold))
        results["reference"] = reference
        _save_worst(f, manifold, results)
    if f.nn_k:
        samples = images_of(next(iter(batches_of(f.samples, f.nn_samples))))[:f.nn_samples]
        results["nearest_neighbors"] = _neighbors(
            f, samples, config or config_flags.config_from_flags(f), feature_net)
    return results


# Kept per sampled image: its pool features (2048) and logits (1008) as float32.
_FEATURE_BYTES = 4 * (2048 + 1008)


def _evaluate_model(f) -> dict[str, Any]:
    num_samples = f.num_samples or DEFAULT_NUM_SAMPLES["model"]
    image_bytes = 0
    if f.save_samples:
        planned = (presets.Config.from_dict(serving.read_metadata(f.saved_model)["config"])
                   if f.saved_model else checkpoints.config_of(f.workdir or f.checkpoint))
        image_bytes = planned.data.image_size ** 2 * planned.data.channels * 4  # float32
    cli.check_memory(num_samples, _FEATURE_BYTES + image_bytes,
                     "evaluate fewer --num_samples (FID's bias at 10,000 is small next to its "
                     "spread between runs), or save the samples in parts with ncsn_tf.sample.")
    feature_net = inception.load_feature_network(f.inception, cache_dir=f.cache_dir)
    overrides = _config_overrides(f)
    if f.saved_model:
        if f.data_init:
            raise app.UsageError("--data_init needs held-out images at sampling time, which "
                                 "an export does not take: evaluate the checkpoint instead "
                                 "(--workdir or --checkpoint).")
        model = load_saved_model(f.saved_model, n_steps_each=f.n_steps_each, step_lr=f.step_lr,
                                 denoise=f.denoise)
    else:
        model = load_checkpoint_model(f.workdir or f.checkpoint, overrides)
    config = presets.override(model.config, **overrides)
    ref_stats, reference = _reference(f, config, feature_net)
    manifold = _manifold(f, config, feature_net)
    seed = f.seed or 0
    keep = [] if f.save_samples or f.nn_k else None  # all images to save, else a few for nn
    results = model_fid_is(
        model, feature_net, ref_stats, seed=seed,
        num_samples=num_samples, batch_size=f.sampling_batch_size,
        eval_batch_size=f.eval_batch_size, splits=f.splits, keep=keep,
        keep_images=None if f.save_samples else f.nn_samples, manifold=manifold)
    results["reference"] = reference
    _save_worst(f, manifold, results)
    if f.save_samples:
        images = np.concatenate(keep)
        save_samples(f.save_samples, images, np.arange(seed, seed + len(images), dtype=np.int64))
        results["saved_samples"] = f.save_samples
    if f.nn_k:
        results["nearest_neighbors"] = _neighbors(f, np.concatenate(keep)[:f.nn_samples],
                                                  config, feature_net)
    return results


def _sweep(f) -> dict[str, Any]:
    selected_checkpoints(f.sweep_workdir, f.begin_step, f.end_step)  # fail before any work
    feature_net = inception.load_feature_network(f.inception, cache_dir=f.cache_dir)
    overrides = _config_overrides(f)
    config = presets.override(checkpoints.read_config(f.sweep_workdir), **overrides)
    ref_stats, reference = _reference(f, config, feature_net)
    csv_path = f.fast_fid_csv or os.path.join(f.sweep_workdir, SWEEP_CSV)
    log_dir = f.fast_fid_logdir or os.path.join(f.sweep_workdir, SWEEP_LOGDIR)
    rows = fast_fid_sweep(
        f.sweep_workdir, feature_net, ref_stats,
        num_samples=f.num_samples or DEFAULT_NUM_SAMPLES["sweep"], begin_step=f.begin_step,
        end_step=f.end_step, seed=f.seed or 0, batch_size=f.sampling_batch_size,
        eval_batch_size=f.eval_batch_size, splits=f.splits, config_overrides=overrides,
        csv_path=csv_path, log_dir=log_dir)
    return {"sweep_workdir": f.sweep_workdir, "best": min(rows, key=lambda row: row["fid"]),
            "checkpoints": rows,
            "reference": reference, "csv": csv_path, "tensorboard": log_dir}


if __name__ == "__main__":
    define_flags()
    cli.run(main)
