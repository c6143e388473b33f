"""Image files in and out: uint8 conversion, PNG grids (upscaled when small), PNG files.

Kept apart from the sampler and the metrics so that training, sampling, evaluation and the
pipeline can write a picture without importing each other.
"""
from __future__ import annotations

import math
import os

import numpy as np
import tensorflow as tf

# Grids show every image at least this many pixels tall (nearest-neighbour, integer factor):
# a 16-px digit becomes a readable 64-px tile.
MIN_TILE = 64


def to_uint8(images) -> tf.Tensor:
    """Images in [0, 1] (values outside are clipped) to uint8, rounding to nearest."""
    images = tf.clip_by_value(tf.convert_to_tensor(images, tf.float32), 0.0, 1.0)
    return tf.cast(tf.floor(images * 255.0 + 0.5), tf.uint8)


def upscale_factor(height: int, min_tile: int = MIN_TILE) -> int:
    """The integer factor that makes an image `height` pixels tall at least `min_tile`."""
    return max(1, math.ceil(min_tile / height))


def image_grid(images, ncol: int | None = None, padding: int = 2,
               min_tile: int = MIN_TILE) -> tf.Tensor:
    """uint8 [rows·(H+pad)+pad, ncol·(W+pad)+pad, C] grid of images [N, H, W, C] in [0, 1]
    (`ncol` columns, default ⌈√N⌉), each image first enlarged by nearest neighbour to at least
    `min_tile` pixels tall (0: never)."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    if min_tile:
        factor = upscale_factor(h, min_tile)
        images = tf.repeat(tf.repeat(images, factor, axis=1), factor, axis=2)
        h, w = h * factor, w * factor
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    images = tf.pad(images, [[0, nrow * ncol - n], [padding, 0], [padding, 0], [0, 0]])
    grid = tf.reshape(tf.transpose(tf.reshape(images, [nrow, ncol, h + padding, w + padding, c]),
                                   [0, 2, 1, 3, 4]),
                      [nrow * (h + padding), ncol * (w + padding), c])
    return tf.pad(grid, [[0, padding], [0, padding], [0, 0]])


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
