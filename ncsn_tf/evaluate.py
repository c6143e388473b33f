"""FID, Inception Score and nearest neighbours of generated samples; `python -m ncsn_tf.evaluate`.

Samples come as an `.npz` file, a folder of images, an array, a `tf.data.Dataset`, any iterable
of batches, or are drawn on the fly from a trained model: a checkpoint (the EMA weights, with
the annealed Langevin sampler of ncsn_tf.sampling) or an exported SavedModel (its
`serving_default` signature). Image i of a model comes from seed `seed + i`, so a run is
reproducible and gives the same images as `python -m ncsn_tf.sample` and TF Serving. Samples
are streamed through a `FeatureNetwork` (ncsn_tf.inception), so memory stays bounded. Reference
statistics of a dataset are computed once and cached as an `.npz` (`mu`, `sigma`: the TTUR
layout, so published statistics files load too).

    python -m ncsn_tf.evaluate --samples=samples.npz --inception=tfgan:/models/inception \
        --preset=cifar10 --ref_stats=stats/cifar10_train.npz --nn_k=9
    python -m ncsn_tf.evaluate --workdir=runs/cifar10 --num_samples=50000 \
        --ref_stats=stats/cifar10_train.npz
    python -m ncsn_tf.evaluate --sweep_workdir=runs/cifar10 --num_samples=1000 \
        --ref_stats=stats/cifar10_train.npz     # fast FID of every checkpoint
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from ncsn_tf import checkpoints, data, export, images as image_io, inception, metrics, presets
from ncsn_tf import sampling
from ncsn_tf import flags as config_flags
from ncsn_tf.inception import FeatureNetwork

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
Statistics = tuple[np.ndarray, np.ndarray]
# int64 seeds [n] -> uint8 images [n, H, W, C], one image per seed.
SampleFn = Callable[[np.ndarray], np.ndarray]


# --- sample sources ---------------------------------------------------------------------------

def load_samples(path: str) -> np.ndarray:
    """Images [N, H, W, C] from an `.npz`: the key `samples`, else its first array.

    uint8 or float in [0, 1]. NCHW arrays (channels 1 or 3 in axis 1 but not in the last
    axis) are transposed to NHWC; an array with 1 or 3 in the last axis is taken as NHWC.
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if not data.files:
        raise ValueError(f"{path} holds no arrays.")
    images = data["samples"] if "samples" in data.files else data[data.files[0]]
    return to_nhwc(images, source=path)


def to_nhwc(images: np.ndarray, source: str = "samples") -> np.ndarray:
    """NHWC view of a batch of images given as NHWC or NCHW (see `load_samples` for the rule)."""
    images = np.asarray(images)
    if images.ndim == 3:  # [N, H, W]: single-channel images
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{source}: expected images [N, H, W, C] or [N, C, H, W]; got shape "
                         f"{images.shape}.")
    if images.shape[-1] in (1, 3):
        return images
    if images.shape[1] in (1, 3):
        return np.transpose(images, (0, 2, 3, 1))
    raise ValueError(f"{source}: shape {images.shape} has no channel axis of size 1 or 3 "
                     "(first or last); expected NHWC or NCHW images.")


def image_folder_batches(folder: str, batch_size: int) -> tf.data.Dataset:
    """Batches of uint8 RGB images from the image files of `folder` (sorted by name)."""
    files = sorted(f for f in tf.io.gfile.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}.")
    paths = [os.path.join(folder, f) for f in files]
    shape = tf.io.decode_image(tf.io.read_file(paths[0]), channels=3,
                               expand_animations=False).shape

    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        same_size = tf.debugging.assert_equal(tf.shape(image), shape, message=(
            f"Images in {folder} differ in size: all must be {shape[0]}x{shape[1]}, as "
            f"{files[0]} is."))
        with tf.control_dependencies([same_size]):
            return tf.ensure_shape(tf.identity(image), shape)

    return (tf.data.Dataset.from_tensor_slices(paths)
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))


def batches_of(source: Any, batch_size: int) -> Iterable:
    """Batches from an `.npz` path, an image folder, an array, a Dataset or an iterable."""
    if isinstance(source, str):
        if tf.io.gfile.isdir(source):
            return image_folder_batches(source, batch_size)
        if source.endswith(".npz"):
            source = load_samples(source)
        else:
            raise ValueError(f"Samples {source!r}: expected an .npz file or a folder of images.")
    if isinstance(source, np.ndarray):
        images = to_nhwc(source)
        return (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    return source


def _images(batch) -> np.ndarray:
    """The images of one batch: the batch itself, element 0 of a tuple, or dict['image']."""
    if isinstance(batch, dict):
        batch = batch["image"]
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    return to_nhwc(batch.numpy() if isinstance(batch, tf.Tensor) else batch)


class _Progress:
    """Logs images done, images/s and, given the total, the time left; at most every `every_s`
    seconds."""

    def __init__(self, what: str, total: int | None = None, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.count, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int, final: bool = False) -> None:
        self.count += n
        now = time.perf_counter()
        if final or now - self.last >= self.every_s:
            self.last = now
            rate = self.count / max(now - self.start, 1e-9)
            if self.total is None:
                logging.info("%s: %d images, %.1f images/s", self.what, self.count, rate)
            else:
                left = (self.total - self.count) / rate if rate > 0 else float("inf")
                logging.info("%s: %d/%d images, %.1f images/s, ETA %s", self.what, self.count,
                             self.total, rate, _duration(left))


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _features(source: Any, feature_net: FeatureNetwork, *, batch_size: int,
              max_images: int | None, what: str) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(features, logits) per batch of `source`, stopping after `max_images` images."""
    batches = batches_of(source, batch_size)
    if (isinstance(batches, tf.data.Dataset) and max_images is None
            and batches.cardinality() == tf.data.INFINITE_CARDINALITY):
        raise ValueError(f"{what}: the dataset repeats forever; pass max_images.")
    progress = _Progress(f"{what} through {feature_net.name}")
    for batch in batches:
        images = _images(batch)
        if max_images is not None:
            images = images[:max_images - progress.count]
        if len(images):
            yield feature_net(images)
            progress.update(len(images))
        if max_images is not None and progress.count >= max_images:
            break
    progress.update(0, final=True)


def dataset_statistics(source: Any, feature_net: FeatureNetwork, *, batch_size: int = 250,
                       max_images: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, number of images) of the features of all images in `source`, streamed."""
    accumulator = metrics.StatisticsAccumulator()
    for features, _ in _features(source, feature_net, batch_size=batch_size,
                                 max_images=max_images, what="statistics"):
        accumulator.update(features)
    mu, sigma = accumulator.result()
    return mu, sigma, accumulator.count


def reference_statistics(config: presets.Config, feature_net: FeatureNetwork,
                         cache_path: str | None, *, split: str = "train", batch_size: int = 250,
                         max_images: int | None = None) -> Statistics:
    """(mu, sigma) of the dataset of `config`, loaded from `cache_path` or computed and saved.

    The cache is trusted as is (delete it to recompute, e.g. after changing `max_images`), but
    a cache written for another feature network is refused.
    """
    if cache_path and tf.io.gfile.exists(cache_path):
        logging.info("Reference statistics from %s", cache_path)
        return metrics.load_statistics(cache_path, network=feature_net.name)
    batches = data.load(config, split, training=False, batch_size=batch_size)
    mu, sigma, count = dataset_statistics(batches, feature_net, batch_size=batch_size,
                                          max_images=max_images)
    if cache_path:
        metrics.save_statistics(cache_path, mu, sigma, network=feature_net.name, num_images=count)
        logging.info("Saved reference statistics of %d %s/%s images to %s", count,
                     config.data.dataset, split, cache_path)
    return mu, sigma


def compute_fid_is(samples: Any, feature_net: FeatureNetwork, ref_stats: Statistics | str, *,
                   batch_size: int = 250, max_images: int | None = None,
                   splits: int = 10) -> dict[str, Any]:
    """FID against `ref_stats` ((mu, sigma) or an `.npz` path) and Inception Score of samples.

    `samples`: anything `batches_of` takes, e.g. an `.npz` path, a folder, an array, a
    Dataset or a generator of batches (uint8, or float in [0, 1]). The Inception Score is
    None when the network has no classifier head.
    """
    reference = None
    if isinstance(ref_stats, str):
        reference = ref_stats
        ref_stats = metrics.load_statistics(ref_stats, network=feature_net.name)
    accumulator, all_logits = metrics.StatisticsAccumulator(), []
    for features, logits in _features(samples, feature_net, batch_size=batch_size,
                                      max_images=max_images, what="samples"):
        accumulator.update(features)
        if logits is not None:
            all_logits.append(logits)
    mu, sigma = accumulator.result()
    if accumulator.count < mu.shape[0]:
        logging.warning("FID from %d images with %d features is biased upwards (rank-deficient "
                        "covariance); published FIDs use 50,000 samples.",
                        accumulator.count, mu.shape[0])
    result: dict[str, Any] = {
        "fid": metrics.frechet_distance(mu, sigma, *ref_stats),
        "inception_score": None,
        "inception_score_std": None,
        "num_images": accumulator.count,
        "splits": splits,
        "network": feature_net.name,
    }
    if reference is not None:
        result["reference"] = reference
    if all_logits:
        result["inception_score"], result["inception_score_std"] = metrics.inception_score(
            np.concatenate(all_logits), splits=splits)
    return result


# --- samples drawn on the fly from a model ----------------------------------------------------

@dataclasses.dataclass
class TrainedModel:
    """A trained model to draw samples from, with what the results should record about it."""
    sample_fn: SampleFn
    config: presets.Config  # its training config (dataset of the reference statistics)
    step: int
    source: str  # checkpoint prefix, workdir or SavedModel directory
    sampler: dict[str, Any]  # n_steps_each, step_lr, denoise, num_scales
    net: Any = None  # a checkpoint's network: weights assigned to it are what gets sampled


def checkpoint_sample_fn(net, config: presets.Config) -> SampleFn:
    """Annealed Langevin dynamics on `net` (pass the EMA network) with `config.sampling`.

    With `data_init` (as the official FID mode allows), the image of seed s starts from
    held-out image s (mod the split's size) perturbed by σ1, instead of uniform noise. The
    sampler is traced once; it reads `net`'s variables, so weights assigned to `net`
    afterwards (the next checkpoint of a sweep) are sampled without retracing.
    """
    sampler = sampling.AnnealedLangevin.from_config(
        lambda x, labels: net(x, labels, training=False), net.sigmas, config)
    starts = data.HeldOutImages(config) if config.sampling.data_init else None

    def sample_fn(seeds):
        init = None if starts is None else starts(seeds)
        return image_io.to_uint8(sampler.sample(seeds, init)["samples"]).numpy()

    return sample_fn


def load_checkpoint_model(path: str, config_overrides: dict[str, Any] | None = None
                          ) -> TrainedModel:
    """The EMA network of a workdir (its latest checkpoint) or checkpoint prefix.

    `config_overrides`: flat config fields to change (None values are ignored), e.g. the
    sampler's `n_steps_each`, `step_lr`, `denoise`, or `precision` (the network is built in
    that precision).
    """
    overrides = {k: v for k, v in (config_overrides or {}).items() if v is not None}
    net, config, step = checkpoints.load(path, ema=True, precision=overrides.get("precision"))
    config = presets.override(config, **overrides)
    config_flags.validate(config)
    return TrainedModel(checkpoint_sample_fn(net, config), config, step, path,
                 _sampler_settings(config), net)


def load_saved_model(export_dir: str, *, n_steps_each: int | None = None,
                     step_lr: float | None = None, denoise: bool | None = None) -> TrainedModel:
    """A SavedModel of `ncsn_tf.export`, sampled through `serving_default` or, when any
    sampler setting is given, `sample_with_settings` (the others from the export).

    Calls are split to respect the export's `max_batch`.
    """
    if not tf.io.gfile.exists(os.path.join(export_dir, export.METADATA_FILE)):
        raise FileNotFoundError(f"{export_dir} has no {export.METADATA_FILE}: expected a "
                                "version directory written by `python -m ncsn_tf.export` "
                                "(e.g. saved_models/ncsn/1).")
    metadata = export.read_metadata(export_dir)
    loaded = tf.saved_model.load(export_dir)
    settings = dict(metadata["sampler"])
    given = dict(n_steps_each=n_steps_each, step_lr=step_lr, denoise=denoise)
    if any(v is not None for v in given.values()):
        settings.update({k: v for k, v in given.items() if v is not None})
        signature = "sample_with_settings"
        arguments = dict(n_steps_each=tf.constant(settings["n_steps_each"], tf.int32),
                         step_lr=tf.constant(settings["step_lr"], tf.float32),
                         denoise=tf.constant(settings["denoise"], tf.bool))
    else:
        signature, arguments = "serving_default", {}
    max_batch = int(metadata["bounds"]["max_batch"])

    def sample_fn(seeds):
        run = loaded.signatures[signature]  # via `loaded`, which owns the variables
        return np.concatenate([
            run(seed=tf.constant(seeds[i:i + max_batch], tf.int64), **arguments)["images"]
            .numpy() for i in range(0, len(seeds), max_batch)])

    settings["num_scales"] = int(metadata["num_levels"])
    return TrainedModel(sample_fn, presets.Config.from_dict(metadata["config"]),
                 int(metadata["step"]), export_dir, settings)


def _sampler_settings(config: presets.Config) -> dict[str, Any]:
    s = config.sampling
    return dict(n_steps_each=s.n_steps_each, step_lr=s.step_lr, denoise=s.denoise,
                num_scales=config.model.num_scales, data_init=s.data_init)


def generate_samples(sample_fn: SampleFn, num_samples: int, batch_size: int, *,
                     seed: int = 0) -> Iterator[np.ndarray]:
    """uint8 batches of `num_samples` images, image i from seed `seed + i`, logging progress
    (images/s, time left)."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch size ({batch_size}) must be "
                         ">= 1.")
    progress = _Progress("generating", total=num_samples)
    for start in range(seed, seed + num_samples, batch_size):
        seeds = np.arange(start, min(start + batch_size, seed + num_samples), dtype=np.int64)
        images = sample_fn(seeds)
        progress.update(len(images), final=start + batch_size >= seed + num_samples)
        yield images


def model_fid_is(model: TrainedModel, feature_net: FeatureNetwork,
                 ref_stats: Statistics | str, *, num_samples: int,
                 batch_size: int | None = None, seed: int = 0, eval_batch_size: int = 250,
                 splits: int = 10, keep: list[np.ndarray] | None = None,
                 keep_images: int | None = None) -> dict[str, Any]:
    """FID and IS (`compute_fid_is`) of `num_samples` images drawn from `model`.

    `batch_size` defaults to the model config's `sampling_batch_size`. The generated batches
    are appended to `keep` when given (at most `keep_images` images; None: all), e.g. to
    save them or to look for their nearest neighbours.
    """
    batches = generate_samples(model.sample_fn, num_samples,
                               batch_size or model.config.sampling.sampling_batch_size,
                               seed=seed)
    if keep is not None:
        batches = _kept(batches, keep, keep_images)
    result = compute_fid_is(_split(batches, eval_batch_size), feature_net, ref_stats,
                            splits=splits)
    result["model"] = {"source": model.source, "step": model.step, "seed": seed,
                       **model.sampler}
    return result


def _split(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The batches cut into pieces of at most `size` images (for the feature network)."""
    for batch in batches:
        for start in range(0, len(batch), size):
            yield batch[start:start + size]


def _kept(batches: Iterable[np.ndarray], keep: list[np.ndarray],
          limit: int | None) -> Iterator[np.ndarray]:
    count = 0
    for batch in batches:
        if limit is None or count < limit:
            keep.append(batch if limit is None else batch[:limit - count])
            count += len(keep[-1])
        yield batch


def save_samples(path: str, images: np.ndarray, seeds: np.ndarray) -> None:
    """Writes uint8 images under `samples` and their `seeds` (the layout of ncsn_tf.sample)."""
    buffer = io.BytesIO()  # np.savez seeks back, which a GFile opened for writing refuses
    np.savez(buffer, samples=images, seeds=seeds)
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


# --- fast FID over the checkpoints of a run ---------------------------------------------------

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
    selected = _selected_checkpoints(workdir, begin_step, end_step)
    csv_path = csv_path or os.path.join(workdir, SWEEP_CSV)
    log_dir = log_dir or os.path.join(workdir, SWEEP_LOGDIR)
    if isinstance(ref_stats, str):
        ref_stats = metrics.load_statistics(ref_stats, network=feature_net.name)
    writer = tf.summary.create_file_writer(log_dir)
    model, rows = None, []
    for _, prefix in selected:
        if model is None:  # traces the sampler once; later weights are copied into its net
            model = load_checkpoint_model(prefix, config_overrides)
        else:
            loaded, _, model.step = checkpoints.load(
                prefix, ema=True, precision=model.config.training.precision)
            for target, value in zip(model.net.weights, loaded.weights):
                target.assign(value)
            model.source = prefix
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
    best = min(rows, key=lambda r: r["fid"])
    logging.info("Best fast FID: %.3f at step %d (%d samples per checkpoint; %s, %s)",
                 best["fid"], best["step"], num_samples, csv_path, log_dir)
    return rows


def _selected_checkpoints(workdir: str, begin_step: int | None,
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


# --- nearest neighbours -----------------------------------------------------------------------

@dataclasses.dataclass
class Neighbors:
    """The k nearest training images of each sample, nearest first."""
    indices: np.ndarray  # [S, k] positions in the streamed training set
    distances: np.ndarray  # [S, k] L2 distances (pixels in [0, 1], or features)
    images: np.ndarray  # [S, k, H, W, C] float32 in [0, 1]
    space: str  # "pixels" or the feature network's name


def nearest_neighbors(samples: np.ndarray, train: Any, k: int = 9, *,
                      feature_net: FeatureNetwork | None = None, flip: bool = True,
                      batch_size: int = 500) -> Neighbors:
    """For each sample, the k nearest training images by L2 (a memorisation check).

    Distances are between pixels in [0, 1], or between `feature_net` features when given.
    The training set (`train`: anything `batches_of` takes) is streamed once; each block of
    distances is one matrix product, ‖a‖² + ‖b‖² − 2a·b. With `flip`, a training image's
    distance is the smaller of those to the sample and to its mirror image, as the official
    evaluation does.
    """
    samples = _as_float(to_nhwc(samples))
    queries = [samples, samples[:, :, ::-1]] if flip else [samples]

    def embed(images):
        if feature_net is None:
            return images.reshape(len(images), -1).astype(np.float64)
        return feature_net(images)[0].astype(np.float64)

    queries = [embed(q) for q in queries]
    query_norms = [np.sum(q * q, axis=1) for q in queries]
    num = len(samples)
    best_d2 = np.full((num, k), np.inf)
    best_index = np.full((num, k), -1, dtype=np.int64)
    best_images = np.zeros((num, k) + samples.shape[1:], np.float32)
    seen = 0
    for batch in batches_of(train, batch_size):
        images = _as_float(_images(batch))
        if images.shape[1:] != samples.shape[1:]:
            raise ValueError(f"Training images have shape {images.shape[1:]} but samples "
                             f"{samples.shape[1:]}; they must match.")
        keys = embed(images)
        key_norms = np.sum(keys * keys, axis=1)
        d2 = np.min([qn[:, None] + key_norms[None, :] - 2.0 * q @ keys.T
                     for q, qn in zip(queries, query_norms)], axis=0)
        merged_d2 = np.concatenate([best_d2, d2], axis=1)
        order = np.argsort(merged_d2, axis=1, kind="stable")[:, :k]
        is_new = order >= k
        new_pos = np.where(is_new, order - k, 0)
        kept = np.where(is_new, 0, order)
        best_images = np.take_along_axis(best_images, kept[..., None, None, None], axis=1)
        best_images[is_new] = images[new_pos[is_new]]
        best_index = np.where(is_new, seen + new_pos, np.take_along_axis(best_index, kept, 1))
        best_d2 = np.take_along_axis(merged_d2, order, axis=1)
        seen += len(images)
    if seen < k:
        raise ValueError(f"Need at least k={k} training images; got {seen}.")
    return Neighbors(best_index, np.sqrt(np.maximum(best_d2, 0.0)), best_images,
                     "pixels" if feature_net is None else feature_net.name)


def _as_float(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def neighbor_grid(samples: np.ndarray, neighbor_images: np.ndarray, padding: int = 2) -> np.ndarray:
    """uint8 image: one row per sample, the sample then its neighbours (after a wider gap)."""
    samples = _as_float(to_nhwc(samples))
    rows = np.concatenate([samples[:, None], neighbor_images], axis=1)  # [S, k+1, H, W, C]
    num_rows, num_cols, h, w, c = rows.shape
    gap = 3 * padding  # between a sample and its neighbours
    grid = np.ones((padding + num_rows * (h + padding),
                    padding + gap + num_cols * (w + padding) - padding, c), np.float32)
    for i in range(num_rows):
        for j in range(num_cols):
            top = padding + i * (h + padding)
            left = padding + j * (w + padding) + (gap - padding if j else 0)
            grid[top:top + h, left:left + w] = rows[i, j]
    return np.round(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8)


# --- command line -----------------------------------------------------------------------------

FLAGS = flags.FLAGS
SOURCES = ("samples", "workdir", "checkpoint", "saved_model", "sweep_workdir")
_MODELS = ("workdir", "checkpoint", "saved_model")
# Flags that only some sources use.
_ONLY_WITH = {
    "preset": ("samples",), "config": ("samples",), "max_images": ("samples",),
    "num_samples": (*_MODELS, "sweep_workdir"), "save_samples": _MODELS,
    "nn_k": ("samples", *_MODELS),
    "begin_step": ("sweep_workdir",), "end_step": ("sweep_workdir",),
    "fast_fid_csv": ("sweep_workdir",), "fast_fid_logdir": ("sweep_workdir",),
}
DEFAULT_NUM_SAMPLES = {"model": 50_000, "sweep": 1_000}


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The CLI's flags; defined on demand so that importing this module defines none.

    The reference dataset is a config: the model's own for a model, else `--preset`,
    `--dataset`, `--data_dir`, ... (see ncsn_tf.flags). Of the config flags, `--seed` is the
    first sample seed and the sampling ones (`--n_steps_each`, `--step_lr`, `--denoise`,
    `--sampling_batch_size`) change how a model samples.
    """
    fv = dict(flag_values=flag_values)
    config_flags.define_config_flags(flag_values)
    flags.DEFINE_string("samples", None, "Samples: an .npz (key 'samples' or its first array; "
                        "uint8 or float in [0,1], NHWC or NCHW) or a folder of images.", **fv)
    flags.DEFINE_string("workdir", None, "Draw the samples from the EMA weights of this "
                        "training workdir's latest checkpoint.", **fv)
    flags.DEFINE_string("checkpoint", None, "Draw the samples from the EMA weights of this "
                        "checkpoint prefix (WORKDIR/checkpoints/ckpt-N).", **fv)
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
        results.update(compute_fid_is(f.samples, feature_net, ref_stats,
                                      batch_size=f.eval_batch_size, max_images=f.max_images,
                                      splits=f.splits))
        results["reference"] = reference
    if f.nn_k:
        samples = _images(next(iter(batches_of(f.samples, f.nn_samples))))[:f.nn_samples]
        results["nearest_neighbors"] = _neighbors(
            f, samples, config or config_flags.config_from_flags(f), feature_net)
    return results


def _evaluate_model(f) -> dict[str, Any]:
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
    seed = f.seed or 0
    keep = [] if f.save_samples or f.nn_k else None  # all images to save, else a few for nn
    results = model_fid_is(
        model, feature_net, ref_stats, seed=seed,
        num_samples=f.num_samples or DEFAULT_NUM_SAMPLES["model"],
        batch_size=f.sampling_batch_size, eval_batch_size=f.eval_batch_size, splits=f.splits,
        keep=keep, keep_images=None if f.save_samples else f.nn_samples)
    results["reference"] = reference
    if f.save_samples:
        images = np.concatenate(keep)
        save_samples(f.save_samples, images, np.arange(seed, seed + len(images), dtype=np.int64))
        results["saved_samples"] = f.save_samples
    if f.nn_k:
        results["nearest_neighbors"] = _neighbors(f, np.concatenate(keep)[:f.nn_samples],
                                                  config, feature_net)
    return results


def _sweep(f) -> dict[str, Any]:
    _selected_checkpoints(f.sweep_workdir, f.begin_step, f.end_step)  # fail before any work
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
    app.run(main)
