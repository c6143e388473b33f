"""ExampleGen's work: a dataset → an Examples directory of sharded TFRecords (train and eval).

An Examples directory holds

    config.yaml               the config the images were prepared with (preset, size, channels)
    train-00000.tfrecord …    `tf.train.Example`s: `image` (PNG, uint8 [H, W, C]) and
    eval-00000.tfrecord  …    `split_salt` (int64), at most `examples_per_shard` per file

and reads back with `ncsn_tf.data` as `--dataset=tfrecord:DIR/*.tfrecord` (`dataset_spec`):
split "train" gives exactly the train records and split "test" exactly the eval records.
`ncsn_tf.data` puts a record in its test split when the record's bytes hash into bucket 0 of
`data.TEST_BUCKETS`; `split_salt` is chosen per record so that this rule agrees with the split
ExampleGen assigned, which is the source dataset's own train / held-out split.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import yaml

from ncsn_tf import data
from ncsn_tf.config import presets

CONFIG_FILE = "config.yaml"
SPLITS = ("train", "eval")  # ExampleGen's names; ncsn_tf.data calls the held-out one "test"
EXAMPLES_PER_SHARD = 10_000
_SALT_BATCH = {"train": 4, "eval": 64}  # candidates hashed at once: 95% / 5% of salts fit
_MAX_SALT = 1 << 16


def dataset_spec(examples_dir: str) -> str:
    """The `config.data.dataset` that reads an Examples directory with `ncsn_tf.data`."""
    return "tfrecord:" + os.path.join(examples_dir, "*.tfrecord")


def source_config(examples_dir: str) -> presets.Config:
    """The config the examples were made with; its dataset is the source they came from."""
    path = os.path.join(examples_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{examples_dir} is not an Examples directory (no {CONFIG_FILE}).")
    with tf.io.gfile.GFile(path) as f:
        return presets.Config.from_dict(yaml.safe_load(f))


def read_config(examples_dir: str) -> presets.Config:
    """The config the examples were made with, its dataset pointing at the examples."""
    return presets.override(source_config(examples_dir), dataset=dataset_spec(examples_dir),
                            data_dir=None)


def write(config: presets.Config, examples_dir: str, *, max_train_examples: int | None = None,
          max_eval_examples: int | None = None,
          examples_per_shard: int = EXAMPLES_PER_SHARD) -> dict[str, Any]:
    """Reads `config.data.dataset` (no augmentation) and writes its train and held-out splits.

    Images are preprocessed by `ncsn_tf.data` (crop, resize, channels) and stored as 8-bit PNG.
    Returns a summary: source, preset, shape, examples per split, files.
    """
    if examples_per_shard < 1:
        raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
    tf.io.gfile.makedirs(examples_dir)
    limits = {"train": max_train_examples, "eval": max_eval_examples}
    source_splits = {"train": "train", "eval": data.eval_split(config)}
    counts, files = {}, {}
    for split in SPLITS:
        images = data.load(config, source_splits[split], training=False)
        if limits[split]:
            images = images.take(limits[split])
        counts[split], files[split] = _write_split(_png_bytes(images), examples_dir, split,
                                                   examples_per_shard)
        if counts[split] == 0:
            raise ValueError(f"The {source_splits[split]} split of {config.data.dataset} is "
                             "empty; the pipeline needs images in both the train and the "
                             "held-out split.")
    with tf.io.gfile.GFile(os.path.join(examples_dir, CONFIG_FILE), "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    size, channels = config.data.image_size, config.data.channels
    return {"source": config.data.dataset, "preset": config.name,
            "source_splits": source_splits, "shape": [size, size, channels],
            "num_train": counts["train"], "num_eval": counts["eval"], "files": files,
            "dataset_spec": dataset_spec(examples_dir)}


def _png_bytes(images: tf.data.Dataset) -> Iterator[bytes]:
    """PNG encodings of float images in [0, 1], quantised to 8 bits."""
    encoded = images.map(
        lambda x: tf.io.encode_png(tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0),
                                           tf.uint8)),
        num_parallel_calls=tf.data.AUTOTUNE)
    return encoded.as_numpy_iterator()


def _write_split(pngs: Iterator[bytes], examples_dir: str, split: str,
                 examples_per_shard: int) -> tuple[int, list[str]]:
    count, files, writer = 0, [], None
    try:
        for png in pngs:
            if count % examples_per_shard == 0:
                if writer:
                    writer.close()
                files.append(f"{split}-{len(files):05d}.tfrecord")
                writer = tf.io.TFRecordWriter(os.path.join(examples_dir, files[-1]))
            writer.write(salted_record(png, split))
            count += 1
    finally:
        if writer:
            writer.close()
    return count, files


def salted_record(png: bytes, split: str) -> bytes:
    """A serialized Example of `png` whose bytes `ncsn_tf.data` assigns to `split`."""
    want_test = split == "eval"
    batch = _SALT_BATCH[split]
    for first in range(0, _MAX_SALT, batch):
        candidates = [_serialize(png, salt) for salt in range(first, first + batch)]
        buckets = tf.strings.to_hash_bucket_fast(candidates, data.TEST_BUCKETS).numpy()
        fits = np.flatnonzero((buckets == 0) == want_test)
        if fits.size:
            return candidates[fits[0]]
    raise RuntimeError(f"No split_salt below {_MAX_SALT} puts this record in split {split!r}; "
                       "has ncsn_tf.data's split rule changed?")


def _serialize(png: bytes, salt: int) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
        "split_salt": tf.train.Feature(int64_list=tf.train.Int64List(value=[salt])),
    })).SerializeToString()
