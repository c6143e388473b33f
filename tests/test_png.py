"""ncsn_tf.png: the NumPy PNG codec against TensorFlow's (libpng), and its refusals."""
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf

from ncsn_tf import png


def _images():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:37, 0:29]
    smooth = (x * 7 + y * 3)[..., None] + np.array([0, 60, 120])  # gradients: libpng filters
    for channels in (1, 2, 3, 4):
        yield rng.integers(0, 256, (13, 17, channels), dtype=np.uint8)
        yield (smooth[..., :1].repeat(channels, -1) + np.arange(channels) * 40).astype(np.uint8)
    yield (smooth % 256).astype(np.uint8)


def _filters(data: bytes, height: int) -> set[int]:
    """The row filter types used in a PNG (one IDAT chunk, as libpng writes small images)."""
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8:start - 4])[0]
    raw = zlib.decompress(data[start:start + length])
    stride = len(raw) // height
    return {raw[row * stride] for row in range(height)}


def test_decode_reads_what_libpng_writes_with_every_row_filter():
    used = set()
    for image in _images():
        encoded = tf.io.encode_png(image).numpy()
        used |= _filters(encoded, image.shape[0])
        decoded = png.decode(encoded)
        expected = image[..., :-1] if image.shape[-1] in (2, 4) else image  # alpha dropped
        np.testing.assert_array_equal(decoded, expected)
    assert used == {0, 1, 2, 3, 4}  # none, sub, up, average, Paeth all exercised


def test_encode_is_read_back_by_libpng():
    for image in _images():
        np.testing.assert_array_equal(tf.io.decode_png(png.encode(image)).numpy(), image)


def test_grid_places_each_image_enlarged_with_padding():
    images = np.arange(5 * 16 * 16 * 1, dtype=np.uint32).reshape(5, 16, 16, 1) % 251
    grid = png.grid(images.astype(np.uint8), ncol=3, padding=2)
    assert grid.shape == (2 * (64 + 2) + 2, 3 * (64 + 2) + 2, 1)  # 16 px shown 4x
    for i in range(5):
        top, left = 2 + (i // 3) * 66, 2 + (i % 3) * 66
        tile = grid[top:top + 64, left:left + 64]
        np.testing.assert_array_equal(tile[::4, ::4], images[i])
        np.testing.assert_array_equal(tile[3::4, 3::4], images[i])
    assert not grid[:2].any() and not grid[68:, 134:].any()  # padding and the empty slot


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"GIF89a" + d[6:], "not a PNG"),
    (lambda d: d[:60], "damaged PNG"),
    (lambda d: d.replace(b"IHDR", b"IHDX"), "no header"),
])
def test_decode_refuses_what_it_cannot_read(damage, message):
    data = tf.io.encode_png(np.full((8, 8, 3), 7, np.uint8)).numpy()
    with pytest.raises(ValueError, match=message):
        png.decode(damage(data))


def test_decode_refuses_16_bit_images_by_name():
    data = tf.io.encode_png(np.zeros((4, 4, 1), np.uint16)).numpy()
    with pytest.raises(ValueError, match="bit depth 16"):
        png.decode(data)
