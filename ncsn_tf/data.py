"""Input pipelines: every dataset becomes a `tf.data.Dataset` of float32 images in [0, 1].

`config.data.dataset` names the source:

- `cifar10`, `mnist`, `celeb_a`, `lsun/<scene category>`: TensorFlow Datasets, read from
  `config.data.data_dir`, preprocessed as the official NCSNv2 code does (CelebA: center crop
  140x140, then resize to the preset size; LSUN and everything else: resize the short side,
  then center crop). Resizing is bilinear with antialiasing, which matches PIL/torchvision.
- `digits`: scikit-learn's bundled 8x8 handwritten digits, upsampled; works offline.
- `folder:PATH`: a tree of PNG/JPEG/GIF/BMP files; unreadable files are skipped and logged.
- `tfrecord:GLOB`: TFRecord files of `tf.train.Example`s (FFHQ and friends), see `load`.

Training pipelines shuffle, repeat forever and augment (random horizontal flip, uniform
dequantization) per the config; evaluation pipelines make one ordered pass without
augmentation. All randomness is seeded; with `deterministic=True` the order is reproducible.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf

from ncsn_tf.config import presets

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
# folder/tfrecord data have no official test split: a file (record) belongs to the test split
# when its relative path (serialized bytes) hashes to bucket 0 of TEST_BUCKETS, i.e. 1 in 20.
TEST_BUCKETS = 20
DIGITS_TEST_SIZE = 197  # the last 197 of scikit-learn's 1797 digits; the first 1600 train
LSUN_CATEGORIES = ("bedroom", "bridge", "church_outdoor", "classroom", "conference_room",
                   "dining_room", "kitchen", "living_room", "restaurant", "tower")
VALID_FORMS = ("cifar10, mnist, celeb_a, lsun/<category> (category: "
               + ", ".join(LSUN_CATEGORIES) + "), digits, folder:PATH, tfrecord:GLOB")
MAX_PIXELS = 4096 * 4096  # larger images are refused before decoding (memory)
BAD_DATA = "Bad data: "  # starts the messages of data errors raised inside a pipeline
_SHUFFLE_BUFFER = 10_000  # examples, for sources read from disk
_SHUFFLE_BUFFER_BYTES = 1 << 30  # cap on the shuffle buffer's memory for large records
_IN_MEMORY_SHUFFLE_BUFFER = 1 << 16  # covers all of CIFAR-10 / MNIST: a full shuffle


class MissingDataError(FileNotFoundError):
    """The data are not on disk and cannot be fetched; the message says what to get and where."""


@dataclasses.dataclass(frozen=True)
class _TfdsDataset:
    eval_split: str
    in_memory: bool  # small enough to cache the decoded images in RAM
    url: str  # where TFDS downloads `files` from
    files: tuple[str, ...]  # TFDS also accepts these names in <data_dir>/downloads/manual
    crop: int | None = None  # center crop applied before resizing
    note: str = ""


_CELEBA_DRIVE = "https://drive.google.com/"
_TFDS = {
    "cifar10": _TfdsDataset("test", True, "https://www.cs.toronto.edu/~kriz/",
                            ("cifar-10-binary.tar.gz",)),
    "mnist": _TfdsDataset("test", True, "https://storage.googleapis.com/cvdf-datasets/mnist/",
                          ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")),
    # Official NCSNv2: torchvision CenterCrop(140) then Resize(64) on the aligned 178x218 faces.
    "celeb_a": _TfdsDataset(
        "test", False, _CELEBA_DRIVE,
        ("img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt",
         "list_landmarks_align_celeba.txt", "identity_CelebA.txt"),
        crop=140,
        note="The files are in the CelebA Google Drive linked from "
             "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (folders Img/, Eval/, Anno/)."),
}


def _lsun(category: str) -> _TfdsDataset:
    return _TfdsDataset(
        "validation", False, "http://dl.yf.io/lsun/scenes/",
        (f"{category}_train_lmdb.zip", f"{category}_val_lmdb.zip"),
        note="See https://www.yf.io/p/lsun (download script: github.com/fyu/lsun). TFDS needs "
             "`pip install tensorflow-io` to prepare LSUN. Alternatively export the images "
             "(`python data.py export ...` of github.com/fyu/lsun) and use "
             "--dataset=folder:PATH.")


def _parse(dataset: str) -> tuple[str, str]:
    """('tfds'|'digits'|'folder'|'tfrecord', argument) for a `config.data.dataset` string."""
    if dataset in _TFDS:
        return "tfds", dataset
    if dataset.startswith("lsun/"):
        if dataset[len("lsun/"):] not in LSUN_CATEGORIES:
            raise ValueError(f"Unknown LSUN category in {dataset!r}; expected lsun/<category> "
                             f"with category one of: {', '.join(LSUN_CATEGORIES)}.")
        return "tfds", dataset
    if dataset == "digits":
        return "digits", ""
    for kind in ("folder", "tfrecord"):
        if dataset.startswith(kind + ":"):
            arg = dataset[len(kind) + 1:]
            if not arg:
                raise ValueError(f"--dataset={kind}: needs a path, e.g. {kind}:/data/images"
                                 + ("/*.tfrecords" if kind == "tfrecord" else ""))
            return kind, arg
    if dataset == "ffhq":
        raise ValueError(
            "FFHQ has no TFDS builder. Use its TFRecords: --dataset=tfrecord:GLOB, e.g. "
            "tfrecord:/data/ffhq/ffhq-r08.tfrecords (256x256, from NVIDIA's ffhq-dataset "
            "`--tfrecords` or StyleGAN's dataset_tool.py), or a folder of images with "
            "--dataset=folder:PATH.")
    raise ValueError(f"Unknown dataset {dataset!r}. Valid forms: {VALID_FORMS}.")


def check_dataset(dataset: str) -> None:
    """Raises ValueError, listing the valid forms, for a `--dataset` no source can read."""
    _parse(dataset)


def _tfds_info(name: str) -> _TfdsDataset:
    return _lsun(name[len("lsun/"):]) if name.startswith("lsun/") else _TFDS[name]


def eval_split(config: presets.Config) -> str:
    """The held-out split of `config.data.dataset` (test loss, FID statistics, σ1)."""
    kind, arg = _parse(config.data.dataset)
    return _tfds_info(arg).eval_split if kind == "tfds" else "test"


class HeldOutImages:
    """Held-out images by index, the starting points of `data_init` sampling: index i is
    example i (mod the split's size) of `eval_split(config)` in its fixed order. Read once,
    only as far as the largest index asked for, and kept."""

    def __init__(self, config: presets.Config):
        self._examples = load(config, eval_split(config), training=False).as_numpy_iterator()
        self._kept: list[np.ndarray] = []
        self._size: int | None = None  # known once the split has been read to its end

    def __call__(self, indices) -> np.ndarray:
        """float32 [len(indices), H, W, C] in [0, 1]."""
        indices = np.asarray(indices, np.int64)
        while self._size is None and len(self._kept) <= indices.max(initial=0):
            example = next(self._examples, None)
            if example is None:
                self._size = len(self._kept)
                if not self._size:
                    raise ValueError("data_init: the held-out split is empty")
            else:
                self._kept.append(example)
        size = self._size or len(self._kept)
        return np.stack([self._kept[i % size] for i in indices])


def load(config: presets.Config, split: str = "train", *, training: bool = True,
         batch_size: int | None = None, seed: int = 0, deterministic: bool = False,
         input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Images of `config.data.dataset`, float32 [H, W, C] in [0, 1] ([B, H, W, C] if batched).

    Args:
      split: "train" or `eval_split(config)`; TFDS sources accept any TFDS split string.
      training: shuffle, repeat forever, random horizontal flip (`random_flip`) and uniform
        dequantization (`uniform_dequantization`: (255 x + u) / 256, u ~ U[0, 1)), and drop
        the last partial batch. False: one ordered pass, no augmentation, partial batch kept.
      batch_size: images per batch; None yields single images. Under
        `strategy.distribute_datasets_from_function` pass the per-replica batch size
        (`input_context.get_per_replica_batch_size(global_batch)`).
      seed: seeds shuffling and augmentation (different pipelines fold in their id).
      deterministic: reproducible order and augmentation in training (parallel maps then
        keep their order, which is slower); evaluation pipelines are always ordered.
      input_context: the `tf.distribute.InputContext` handed to the dataset function of
        `distribute_datasets_from_function`; each input pipeline then reads a disjoint
        1/num_input_pipelines of the data and draws its own random numbers.

    `tfrecord:GLOB` reads `tf.train.Example`s holding either an encoded PNG/JPEG under
    `image` (or `image/encoded`), or NVIDIA/score_sde FFHQ records: `shape` (int64 [3], C, H, W)
    and `data` (the raw uint8 pixels in CHW order). Images of another size are resized (short
    side) and center-cropped; channels are converted to `config.data.channels` (RGB <-> gray).

    Raises:
      MissingDataError: data missing and not downloadable now (the message says what to get).
      ValueError: unknown dataset, split or invalid settings.
    """
    size, channels = config.data.image_size, config.data.channels
    if size < 1 or channels not in (1, 3):
        raise ValueError(f"Need image_size >= 1 and channels 1 or 3, got image_size={size}, "
                         f"channels={channels}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    pipelines, pipeline_id = ((input_context.num_input_pipelines, input_context.input_pipeline_id)
                              if input_context else (1, 0))
    # One well-mixed 31-bit key per (seed, pipeline), so workers draw different numbers.
    key = int(np.random.SeedSequence([seed, pipeline_id]).generate_state(1)[0] >> 1)

    kind, arg = _parse(config.data.dataset)
    if kind == "tfds":
        source = _tfds_source(arg, config, split, training, key, pipelines, pipeline_id)
    elif kind == "digits":
        source = _digits_source(config, _check_split(split), pipelines, pipeline_id)
    elif kind == "folder":
        source = _folder_source(arg, config, _check_split(split), pipelines, pipeline_id)
    else:
        source = _tfrecord_source(arg, config, _check_split(split), training, key, pipelines,
                                  pipeline_id)

    ds = source.records
    if source.in_memory:
        ds = ds.apply(source.decode).cache()
    if training:
        ds = ds.shuffle(source.shuffle_buffer, seed=key, reshuffle_each_iteration=True).repeat()
    if not source.in_memory:
        ds = ds.apply(source.decode)
    if batch_size:
        ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE)
    if training and (config.data.random_flip or config.data.uniform_dequantization):
        ds = ds.enumerate().map(_augmenter(config, key), num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(_to_float, num_parallel_calls=AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic or not training
    return ds.prefetch(AUTOTUNE).with_options(options)


@dataclasses.dataclass
class _Source:
    """Cheap records (paths, encoded images, ...) and the transformation that decodes them to
    uint8 (or float32 in [0, 1]) [size, size, channels] images. Shuffling happens on records."""
    records: tf.data.Dataset
    decode: Callable[[tf.data.Dataset], tf.data.Dataset]
    shuffle_buffer: int
    in_memory: bool = False  # decode once and cache in RAM


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r} for this dataset: use 'train' or 'test'.")
    return split


def _to_float(images: tf.Tensor) -> tf.Tensor:
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return images


def _augmenter(config: presets.Config, key: int):
    """(index, images) -> float images with the configured flip and dequantization.

    Works on one image or a batch; the random numbers come from stateless ops seeded by
    (key, index), so they do not depend on thread scheduling.
    """
    flip, dequantize = config.data.random_flip, config.data.uniform_dequantization

    def augment(index, images):
        images = _to_float(images)
        flip_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.stack([tf.constant(key, tf.int64), index]), num=2))
        if flip:
            leading = tf.shape(images)[:-3]
            flipped = tf.random.stateless_uniform(leading, flip_seed) < 0.5
            flipped = tf.reshape(flipped, tf.concat([leading, [1, 1, 1]], axis=0))
            images = tf.where(flipped, tf.reverse(images, axis=[-2]), images)
        if dequantize:
            noise = tf.random.stateless_uniform(tf.shape(images), noise_seed)
            images = (images * 255.0 + noise) / 256.0
        return images

    return augment


# ---- image geometry (matches torchvision's CenterCrop / Resize on PIL images) ----

def _center_crop(image: tf.Tensor, height, width) -> tf.Tensor:
    """Crop the center; odd margins round half to even, as torchvision's CenterCrop."""
    shape = tf.shape(image)
    top = tf.cast(tf.round(tf.cast(shape[0] - height, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(shape[1] - width, tf.float32) / 2), tf.int32)
    return image[top:top + height, left:left + width]


def _fit(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [h, w, c] -> [size, size, c]: resize the short side to `size` (long side
    truncated as torchvision's Resize), bilinear with antialiasing as PIL, then center crop."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short = tf.minimum(h, w)
    new_h, new_w = size * h // short, size * w // short

    def resize():
        resized = tf.image.resize(tf.cast(image, tf.float32), [new_h, new_w], antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    image = tf.cond(tf.logical_and(new_h == h, new_w == w), lambda: image, resize)
    return tf.ensure_shape(_center_crop(image, size, size), [size, size, None])


def _header_pixels(encoded: tf.Tensor) -> tf.Tensor:
    """Width x height from a PNG/JPEG/GIF/BMP header without decoding; -1 for other bytes."""
    def dims(offset, dtype, little_endian):
        width = 8 if dtype == tf.int32 else 4
        return tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, offset, width), dtype,
                                        little_endian=little_endian), tf.int64)

    def starts(magic):
        return tf.equal(tf.strings.substr(encoded, 0, len(magic)), magic)

    long_enough = tf.strings.length(encoded) >= 26
    hw = tf.case([
        (tf.logical_not(long_enough), lambda: tf.constant([-1, 1], tf.int64)),
        (starts(b"\x89PNG"), lambda: dims(16, tf.int32, False)),
        (starts(b"GIF8"), lambda: dims(6, tf.uint16, True)),
        (starts(b"BM"), lambda: tf.abs(dims(18, tf.int32, True))),
        (starts(b"\xff\xd8"), lambda: tf.cast(tf.image.extract_jpeg_shape(encoded)[:2],
                                               tf.int64)),
    ], default=lambda: tf.constant([-1, 1], tf.int64))
    return tf.reduce_prod(hw)


def _decode(encoded: tf.Tensor, channels: int, name: Callable[[], tf.Tensor] | None = None
            ) -> tf.Tensor:
    """PNG/JPEG/GIF (first frame)/BMP bytes -> uint8 [h, w, channels]; alpha is dropped.

    Bytes of another format, and images over MAX_PIXELS (a 12000x12000 PNG takes gigabytes),
    fail before decoding, with a `BAD_DATA` message naming the image by `name()`."""
    pixels = _header_pixels(encoded)

    def refuse():
        message = tf.strings.join([
            BAD_DATA, name() if name else "an image", " is not a PNG/JPEG/GIF/BMP image or has "
            f"over MAX_PIXELS = {MAX_PIXELS} pixels (header: ", tf.strings.as_string(pixels),
            "). Re-write or remove it and re-run."])
        return tf.debugging.Assert(False, [message])

    check = tf.cond(tf.logical_and(pixels > 0, pixels <= MAX_PIXELS), tf.no_op, refuse)
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return _to_channels(image, channels)


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    have = image.shape[-1]
    if have == channels:
        return image
    if channels == 1:
        return tf.image.rgb_to_grayscale(image)
    return tf.image.grayscale_to_rgb(image)


# ---- TFDS ----

def _tfds_source(name, config, split, training, key, pipelines, pipeline_id) -> _Source:
    import tensorflow_datasets as tfds
    info = _tfds_info(name)
    builder = _prepared_builder(name, info, config.data.data_dir)
    if pipelines > 1:
        split = tfds.even_splits(split, pipelines)[pipeline_id]
    records = builder.as_dataset(
        split=split, shuffle_files=training,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=key, try_autocache=False))
    records = records.map(lambda example: example["image"])
    size, channels, crop = config.data.image_size, config.data.channels, info.crop

    def preprocess(encoded):
        image = _decode(encoded, channels)
        if crop:
            image = _center_crop(image, crop, crop)
        return _fit(image, size)

    return _Source(records, lambda ds: ds.map(preprocess, num_parallel_calls=AUTOTUNE),
                   _IN_MEMORY_SHUFFLE_BUFFER if info.in_memory else _SHUFFLE_BUFFER,
                   in_memory=info.in_memory)


def _prepared_builder(name: str, info: _TfdsDataset, data_dir: str | None):
    """The TFDS builder of `name`, prepared now if needed; fails fast when that is impossible."""
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    manual_dir = os.path.join(str(builder.data_dir_root), "downloads", "manual")
    have_files = all(tf.io.gfile.exists(os.path.join(manual_dir, f)) for f in info.files)
    if not have_files and not _reachable(info.url):
        raise MissingDataError(_missing_message(name, info, builder, manual_dir,
                                                f"no network connection to {info.url}"))
    log.info("Preparing TFDS %s in %s (from %s).", name, builder.data_dir_root,
             manual_dir if have_files else info.url)
    try:
        builder.download_and_prepare()
    except Exception as error:  # any failure here means: the user must fetch the files
        raise MissingDataError(_missing_message(
            name, info, builder, manual_dir, f"{type(error).__name__}: {error}")) from error
    return builder


def _missing_message(name, info, builder, manual_dir, reason) -> str:
    files = "".join(f"\n  {f}" for f in info.files)
    return (f"Dataset {name} is not prepared in the TFDS data_dir {builder.data_dir_root} and "
            f"could not be prepared ({reason}).\nDownload these files from {info.url}:{files}\n"
            f"and put them in {manual_dir}/ ; the next run prepares the dataset from them "
            f"without network. Or prepare it on another machine with `tfds build {name} "
            f"--data_dir=DIR` and pass --data_dir=DIR. {info.note}").rstrip()


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the host of `url` opens within `timeout` seconds. Behind
    an HTTP(S) proxy the answer is unknowable this way, so assume yes."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---- scikit-learn digits ----

def _digits_indices(split: str) -> range:
    total = 1797
    return range(total - DIGITS_TEST_SIZE) if split == "train" else range(
        total - DIGITS_TEST_SIZE, total)


def _digits_source(config, split, pipelines, pipeline_id) -> _Source:
    from sklearn.datasets import load_digits
    indices = _digits_indices(split)
    images = load_digits().images[indices.start:indices.stop][pipeline_id::pipelines]
    images = (images.astype(np.float32) / 16.0)[..., None]  # pixel values are 0..16
    size = config.data.image_size
    images = tf.clip_by_value(tf.image.resize(images, [size, size], method="bilinear"), 0.0, 1.0)
    images = _to_channels(images, config.data.channels)
    return _Source(tf.data.Dataset.from_tensor_slices(images), lambda ds: ds,
                   shuffle_buffer=len(indices), in_memory=True)


# ---- folder of images ----

def _folder_files(root: str, split: str) -> tuple[list[str], list[str]]:
    """(image files of `split`, files of the whole tree without an image extension)."""
    if not tf.io.gfile.isdir(root):
        raise MissingDataError(f"Image folder {root!r} does not exist (dataset folder:{root}).")
    images, others = [], []
    for directory, _, names in tf.io.gfile.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
    if not images:
        raise MissingDataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}"
                               + (f"; found only {len(others)} other files." if others else "."))
    images.sort()
    relative = [os.path.relpath(p, root).replace(os.sep, "/") for p in images]
    in_test = tf.strings.to_hash_bucket_fast(relative, TEST_BUCKETS).numpy() == 0
    chosen = [p for p, t in zip(images, in_test) if t == (split == "test")]
    if not chosen:
        raise MissingDataError(
            f"The {split} split of folder:{root} is empty: it holds the files whose relative "
            f"path hashes into 1 of {TEST_BUCKETS} buckets, and the folder has only "
            f"{len(images)} images. Add images.")
    return chosen, others


def _folder_source(root, config, split, pipelines, pipeline_id) -> _Source:
    paths, others = _folder_files(root, split)
    if others:
        log.warning("folder:%s: skipped %d file(s) that are not %s images by their extension, "
                    "e.g. %s", root, len(others), "/".join(IMAGE_EXTENSIONS), others[:3])
    paths = paths[pipeline_id::pipelines]
    channels = config.data.channels
    decode = _robust_decoder(lambda path: _decode(tf.io.read_file(path), channels),
                             config.data.image_size, channels,
                             _SkipLog(f"folder:{root}", total=len(paths)))
    return _Source(tf.data.Dataset.from_tensor_slices((paths, paths)), decode, len(paths))


class _SkipLog:
    """Counts the images a pipeline could not decode and logs each one once by name (a file,
    or `file#record`). Fails when all `total` images are unreadable (when known), where a
    repeating pipeline would otherwise spin forever."""

    def __init__(self, source: str, total: int | None):
        self.source = source
        self.total = total
        self.skipped: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name: tf.Tensor) -> bool:
        name = name.numpy().decode("utf-8", "replace")
        with self._lock:
            new = name not in self.skipped
            self.skipped.add(name)
            count = len(self.skipped)
        if new:
            log.warning("%s: skipped %s: not a readable PNG/JPEG/GIF/BMP image, or over %d "
                        "pixels (%d skipped so far)", self.source, name, MAX_PIXELS, count)
        if count == self.total:
            raise MissingDataError(f"{self.source}: none of its {count} image files could be "
                                   f"decoded (e.g. {name}).")
        return False


def _robust_decoder(decode: Callable[[tf.Tensor], tf.Tensor], size: int, channels: int,
                    skip_log: _SkipLog):
    """(payload, name) pairs -> images, where payloads that fail to read or decode are
    dropped and reported by name.

    Each payload is decoded in its own tiny dataset whose errors are ignored, followed by a
    placeholder marked invalid: taking the first element tells success from failure
    without stopping the pipeline, and the failure keeps its name for the log.
    """
    placeholder = tf.data.Dataset.from_tensors((tf.zeros([size, size, channels], tf.uint8),
                                                tf.constant(False)))

    def attempt(payload, name):
        decoded = tf.data.Dataset.from_tensors(payload).map(
            lambda p: (_fit(decode(p), size), tf.constant(True)))
        return (decoded.ignore_errors().concatenate(placeholder).take(1)
                .map(lambda image, ok: (image, ok, name)))

    def keep(image, ok, name):
        return tf.cond(ok, lambda: tf.constant(True),
                       lambda: tf.reshape(tf.py_function(skip_log, [name], tf.bool), []))

    return lambda pairs: (pairs.interleave(attempt, num_parallel_calls=AUTOTUNE)
                          .filter(keep).map(lambda image, ok, name: image))


# ---- TFRecords ----

def _tfrecord_source(pattern, config, split, training, key, pipelines, pipeline_id) -> _Source:
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise MissingDataError(f"No TFRecord files match {pattern!r} (dataset tfrecord:{pattern}).")
    first = next(iter(tf.data.TFRecordDataset(files).take(1)), None)
    if first is None:
        raise MissingDataError(f"The TFRecord files matching {pattern!r} hold no records.")
    size, channels = config.data.image_size, config.data.channels
    parse = _record_parser(first.numpy(), pattern, channels)

    sizes = [tf.io.gfile.stat(f).length for f in files]
    if pipelines > 1 and len(files) >= pipelines:
        files, sizes = files[pipeline_id::pipelines], sizes[pipeline_id::pipelines]
    file_ds = tf.data.Dataset.from_tensor_slices((files, np.asarray(sizes, np.int64)))
    if training and len(files) > 1:
        file_ds = file_ds.shuffle(len(files), seed=key, reshuffle_each_iteration=True)
    # Training mixes up to 16 files at a time; evaluation reads them one after another.
    records = file_ds.interleave(_whole_file, cycle_length=min(len(files), 16) if training else 1,
                                 num_parallel_calls=AUTOTUNE)
    if pipelines > 1 and len(files) < pipelines:
        records = records.shard(pipelines, pipeline_id)
    test = split == "test"
    records = records.filter(
        lambda r, path, index: tf.equal(tf.strings.to_hash_bucket_fast(r, TEST_BUCKETS) == 0,
                                        test))
    buffer = int(np.clip(_SHUFFLE_BUFFER_BYTES // len(first.numpy()), 1000, _SHUFFLE_BUFFER))

    def decode(record, path, index):
        return _fit(parse(record, lambda: tf.strings.join(
            ["record ", tf.strings.as_string(index), " of ", path])), size)

    return _Source(records, lambda ds: ds.map(decode, num_parallel_calls=AUTOTUNE), buffer)


def _whole_file(path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
    """(record, path, index) of one TFRecord file; fails naming the file where it is cut
    short or corrupt. (TFRecordDataset alone reads a cut header as the end of the file, and
    reports a bad checksum without the file's name.) Its bytes are counted against its size."""
    ending = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True)))
    records = (tf.data.TFRecordDataset(path).ignore_errors()
               .map(lambda record: (record, tf.constant(False))).concatenate(ending))

    def count(state, element):
        offset, index = state
        record, last = element

        def refuse():
            message = tf.strings.join([
                BAD_DATA, "TFRecord file ", path, " is cut short or corrupt after record ",
                tf.strings.as_string(index), " (byte ", tf.strings.as_string(offset), " of ",
                tf.strings.as_string(size), "). Re-write or remove it and re-run."])
            return tf.debugging.Assert(False, [message])

        whole = tf.logical_or(tf.logical_not(last), tf.equal(offset, size))
        with tf.control_dependencies([tf.cond(whole, tf.no_op, refuse)]):
            # Each record is framed by a length (8 bytes) and two checksums (4 + 4).
            step = tf.cast(tf.strings.length(record), tf.int64) + 16
        return (offset + step, index + 1), (record, index, last)

    zero = tf.constant(0, tf.int64)
    return (records.scan((zero, zero), count).filter(lambda record, index, last: ~last)
            .map(lambda record, index, last: (record, path, index)))


def bad_data_message(error: tf.errors.OpError) -> str | None:
    """The message of a data error raised inside a pipeline (see `BAD_DATA`), or None when
    `error` is something else."""
    start = error.message.find(BAD_DATA)
    if start < 0:
        return None
    end = error.message.find("re-run.", start)
    return error.message[start + len(BAD_DATA):end + len("re-run.") if end >= 0 else None]


def _record_parser(first: bytes, pattern: str, channels: int):
    """A function serialized Example -> uint8 image (any size), for the layout of `first`."""
    keys = set(tf.train.Example.FromString(first).features.feature)
    for image_key in ("image", "image/encoded"):
        if image_key in keys:
            spec = {image_key: tf.io.FixedLenFeature([], tf.string)}
            return lambda r, name: _decode(tf.io.parse_single_example(r, spec)[image_key],
                                           channels, name)
    if {"shape", "data"} <= keys:
        spec = {"shape": tf.io.FixedLenFeature([3], tf.int64),
                "data": tf.io.FixedLenFeature([], tf.string)}

        def parse_raw(record, name):
            example = tf.io.parse_single_example(record, spec)
            chw = tf.reshape(tf.io.decode_raw(example["data"], tf.uint8), example["shape"])
            image = tf.transpose(chw, [1, 2, 0])
            image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.image.grayscale_to_rgb(image),
                            lambda: image[..., :3])
            return _to_channels(tf.ensure_shape(image, [None, None, 3]), channels)

        return parse_raw
    raise ValueError(f"Unrecognised TFRecord layout in {pattern!r}: features {sorted(keys)}. "
                     "Expected an encoded PNG/JPEG under 'image' (or 'image/encoded'), or "
                     "'shape' (int64 [3], CHW) with 'data' (raw uint8 bytes).")
