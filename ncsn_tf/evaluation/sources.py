"""Where generated images come from for evaluation: `.npz` files, image folders, arrays,
`tf.data` pipelines or any iterable of batches, each turned into NHWC image batches."""
from __future__ import annotations

import io
import os
import zipfile
from typing import Any, Iterable

import numpy as np
import tensorflow as tf

from ncsn_tf.data import IMAGE_EXTENSIONS


def load_samples(path: str) -> np.ndarray:
    """Images [N, H, W, C] from an `.npz`: the key `samples`, else its first array.

    uint8 or float in [0, 1]. NCHW arrays (channels 1 or 3 in axis 1 but not in the last
    axis) are transposed to NHWC; an array with 1 or 3 in the last axis is taken as NHWC.
    """
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"No samples file at {path}.")
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    hint = ("write one with `python -m ncsn_tf.sample --npz=...` or "
            "np.savez(path, samples=images)")
    if not raw.startswith(b"PK\x03\x04"):  # every .npz is a zip archive
        raise ValueError(f"{path} is not an .npz file (it does not start as a zip archive); "
                         + hint)
    try:
        data = np.load(io.BytesIO(raw), allow_pickle=False)
        arrays = {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is a damaged .npz ({str(error).splitlines()[0][:200]}); "
                         + hint) from None
    if not arrays:
        raise ValueError(f"{path} holds no arrays.")
    images = arrays.get("samples", next(iter(arrays.values())))
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


def images_of(batch) -> np.ndarray:
    """The images of one batch: the batch itself, element 0 of a tuple, or dict['image']."""
    if isinstance(batch, dict):
        batch = batch["image"]
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    images = to_nhwc(batch.numpy() if isinstance(batch, tf.Tensor) else batch)
    if images.dtype.kind == "f":
        broken = int((~np.isfinite(images).reshape(len(images), -1).all(axis=1)).sum())
        if broken:
            raise ValueError(f"{broken} of {len(images)} images hold NaN or infinite pixels "
                             "(a diverged model or sampler?): a score of them would be "
                             "meaningless. Look at the samples, then re-sample.")
    return images
