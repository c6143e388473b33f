"""FID, Inception Score and nearest neighbours of generated samples; `python -m ncsn_tf.evaluate`.

Samples come as an `.npz` file, a folder of images, an array, a `tf.data.Dataset` or any
iterable of batches; they are streamed through a `FeatureNetwork` (ncsn_tf.inception), so
memory stays bounded. Reference statistics of a dataset are computed once and cached as an
`.npz` (`mu`, `sigma`: the TTUR layout, so published statistics files load too).

    python -m ncsn_tf.evaluate --samples=samples.npz --inception=tfgan:/models/inception \
        --preset=cifar10 --ref_stats=stats/cifar10_train.npz --nn_k=9
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from typing import Any, Iterable, Iterator

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from ncsn_tf import data, inception, metrics, presets
from ncsn_tf import flags as config_flags
from ncsn_tf.inception import FeatureNetwork

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
Statistics = tuple[np.ndarray, np.ndarray]


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
    """Logs images done and images/s, at most every `every_s` seconds."""

    def __init__(self, what: str, every_s: float = 10.0):
        self.what, self.every_s = what, every_s
        self.count, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int, final: bool = False) -> None:
        self.count += n
        now = time.perf_counter()
        if final or now - self.last >= self.every_s:
            self.last = now
            logging.info("%s: %d images, %.1f images/s", self.what, self.count,
                         self.count / max(now - self.start, 1e-9))


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


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, C] image as PNG (any tf.io.gfile path)."""
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(tf.io.encode_png(image).numpy())


# --- command line -----------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags; defined on demand so that importing this module defines none.

    The reference dataset is a config (`--preset`, `--dataset`, `--data_dir`, ...: see
    ncsn_tf.flags); the remaining flags are the evaluation's own.
    """
    config_flags.define_config_flags()
    flags.DEFINE_string("samples", None, "Samples: an .npz (key 'samples' or its first array; "
                        "uint8 or float in [0,1], NHWC or NCHW) or a folder of images.")
    flags.DEFINE_string("inception", "tfgan", f"Feature network: {inception.SPECS}. tfgan is the "
                        "standard FID network; random-test is for tests only.")
    flags.DEFINE_string("ref_stats", None, "Reference statistics .npz (mu, sigma; e.g. TTUR's "
                        "fid_stats_cifar10_train.npz). If missing, computed from the dataset of "
                        "--preset/--dataset and saved there.")
    flags.DEFINE_string("split", "train", "Reference split.")
    flags.DEFINE_integer("eval_batch_size", 250, "Images per feature-network batch.")
    flags.DEFINE_integer("max_images", None, "Use at most this many samples.")
    flags.DEFINE_integer("max_ref_images", None, "Use at most this many reference images.")
    flags.DEFINE_integer("splits", 10, "Inception Score splits (10 as published; 1 as TF-GAN).")
    flags.DEFINE_integer("nn_k", 0, "Nearest neighbours per sample (0: skip).")
    flags.DEFINE_integer("nn_samples", 10, "Samples to find nearest neighbours for.")
    flags.DEFINE_enum("nn_space", "pixels", ["pixels", "features"], "Distance for neighbours.")
    flags.DEFINE_bool("nn_flip", True, "Also match the mirrored sample, as the official code.")
    flags.DEFINE_string("nn_out", "nearest_neighbors.png", "PNG grid of neighbours.")
    flags.DEFINE_string("report", None, "Also write the results as JSON here.")
    flags.DEFINE_string("cache_dir", None, "Where downloaded networks are kept (default "
                        "$NCSN_TF_CACHE or ~/.cache/ncsn_tf).")


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.samples:
        raise app.UsageError("--samples is required.")
    with_reference = bool(FLAGS.ref_stats or FLAGS.preset or FLAGS.dataset)
    if not (with_reference or FLAGS.nn_k):
        raise app.UsageError("Nothing to do: pass --ref_stats and/or --preset (or --dataset) "
                             "for FID and IS, --nn_k with --preset for nearest neighbours.")
    feature_net = inception.load_feature_network(FLAGS.inception, cache_dir=FLAGS.cache_dir)
    results: dict[str, Any] = {"samples": FLAGS.samples}
    if with_reference:
        if FLAGS.ref_stats and tf.io.gfile.exists(FLAGS.ref_stats):
            ref_stats = FLAGS.ref_stats  # any layout load_statistics reads, e.g. TTUR's
            reference = FLAGS.ref_stats
        else:
            config = config_flags.config_from_flags()
            ref_stats = reference_statistics(config, feature_net, FLAGS.ref_stats,
                                             split=FLAGS.split, batch_size=FLAGS.eval_batch_size,
                                             max_images=FLAGS.max_ref_images)
            reference = FLAGS.ref_stats or f"{config.data.dataset}/{FLAGS.split}"
        results.update(compute_fid_is(FLAGS.samples, feature_net, ref_stats,
                                      batch_size=FLAGS.eval_batch_size,
                                      max_images=FLAGS.max_images, splits=FLAGS.splits))
        results["reference"] = reference
    if FLAGS.nn_k:
        samples = next(iter(batches_of(FLAGS.samples, FLAGS.nn_samples)))
        samples = _images(samples)[:FLAGS.nn_samples]
        train = data.load(config_flags.config_from_flags(), FLAGS.split, training=False,
                          batch_size=FLAGS.eval_batch_size)
        neighbors = nearest_neighbors(
            samples, train, FLAGS.nn_k, flip=FLAGS.nn_flip,
            feature_net=feature_net if FLAGS.nn_space == "features" else None)
        save_png(FLAGS.nn_out, neighbor_grid(samples, neighbors.images))
        results["nearest_neighbors"] = {"png": FLAGS.nn_out, "space": neighbors.space,
                                        "min_distance": float(neighbors.distances[:, 0].min())}
    line = json.dumps(results)
    print(line)
    if FLAGS.report:
        with tf.io.gfile.GFile(FLAGS.report, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
