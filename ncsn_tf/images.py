"""Image files in and out: uint8 conversion, PNG grids (upscaled when small), PNG files.

Kept apart from the sampler and the metrics so that training, sampling, evaluation and the
pipeline can write a picture without importing each other.
"""
from __future__ import annotations

import io
import os

import numpy as np
import tensorflow as tf

from ncsn_tf import png
from ncsn_tf.png import MIN_TILE


def to_uint8(images) -> tf.Tensor:
    """Images in [0, 1] (values outside are clipped) to uint8, rounding to nearest."""
    images = tf.clip_by_value(tf.convert_to_tensor(images, tf.float32), 0.0, 1.0)
    return tf.cast(tf.floor(images * 255.0 + 0.5), tf.uint8)


def image_grid(images, ncol: int | None = None, padding: int = 2,
               min_tile: int = MIN_TILE) -> tf.Tensor:
    """uint8 grid of images [N, H, W, C] in [0, 1]: `ncsn_tf.png.grid` (`ncol` columns,
    default ⌈√N⌉, each image enlarged to at least `min_tile` pixels tall; 0: never)."""
    return tf.constant(png.grid(to_uint8(images).numpy(), ncol, padding, min_tile))


def save_image_grid(images, path: str, ncol: int | None = None, padding: int = 2,
                    min_tile: int = MIN_TILE) -> None:
    """Saves `image_grid(images, ...)` as a PNG file (any tf.io.gfile path)."""
    save_png(path, image_grid(images, ncol, padding, min_tile))


def save_png(path: str, image) -> None:
    """Writes a uint8 [H, W, C] image as PNG (any tf.io.gfile path), creating its folder."""
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(tf.io.encode_png(image).numpy())


def save_samples(path: str, samples: np.ndarray, seeds: np.ndarray, **arrays) -> None:
    """An .npz of uint8 images under `samples`, their `seeds` and any other `arrays` (e.g. a
    `trajectory`): what `ncsn_tf.sample --npz` and `evaluate --save_samples` write (any
    tf.io.gfile path, its folder created)."""
    buffer = io.BytesIO()  # np.savez seeks back, which a GFile opened for writing refuses
    np.savez(buffer, samples=samples, seeds=seeds, **arrays)
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


def read_image(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """An image file as float32 [H, W, C] in [0, 1], converted to C channels; its size must be
    (H, W)."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"Image file {path} does not exist")
    image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    if image.shape[-1] in (2, 4):  # drop alpha
        image = image[..., :-1]
    if image.shape[-1] == 3 and shape[-1] == 1:
        image = tf.image.rgb_to_grayscale(image)
    elif image.shape[-1] == 1 and shape[-1] == 3:
        image = tf.image.grayscale_to_rgb(image)
    if tuple(image.shape[:2]) != tuple(shape[:2]):
        raise ValueError(f"{path} is {image.shape[0]}x{image.shape[1]} pixels, but the model "
                         f"makes {shape[0]}x{shape[1]} images: resize it first")
    return image.numpy().astype(np.float32) / 255.0
