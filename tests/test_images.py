"""Image I/O: uint8 rounding, grid layout and the nearest-neighbour enlargement of small
images, PNG files, reading an image for inpainting."""
import numpy as np
import pytest
import tensorflow as tf

from ncsn_tf.images import image_grid, read_image, save_image_grid, save_png, to_uint8


def test_to_uint8_rounds_and_clips():
    values = np.array([-0.1, 0.0, 0.5, 1 / 255 * 0.49, 1 / 255 * 0.51, 0.999, 1.0, 1.2])
    np.testing.assert_array_equal(to_uint8(values).numpy(), [0, 0, 128, 0, 1, 255, 255, 255])


def test_save_image_grid_layout(tmp_path):
    images = np.stack([np.full((3, 2, 3), (i + 1) / 7, np.float32) for i in range(5)])
    path = str(tmp_path / "grid.png")
    save_image_grid(images, path, ncol=3, padding=2, min_tile=0)
    grid = tf.io.decode_png(tf.io.read_file(path)).numpy()
    assert grid.shape == (2 * (3 + 2) + 2, 3 * (2 + 2) + 2, 3)
    for i in range(6):
        row, col = divmod(i, 3)
        tile = grid[2 + row * 5: 5 + row * 5, 2 + col * 4: 4 + col * 4]
        expected = round((i + 1) / 7 * 255) if i < 5 else 0  # the 6th cell is empty
        assert np.all(tile == expected), i
    assert np.all(grid[:2] == 0) and np.all(grid[:, :2] == 0)  # padding


def test_small_images_are_enlarged_by_nearest_neighbour(tmp_path):
    """A 16-px digit is shown 64 px tall (factor 4), each pixel a 4x4 block; large images are
    left alone."""
    rng = np.random.default_rng(0)
    small = rng.uniform(size=(6, 16, 16, 1)).astype(np.float32)
    grid = image_grid(small, ncol=3, padding=2).numpy()
    assert grid.shape == (2 * (64 + 2) + 2, 3 * (64 + 2) + 2, 1)
    tile = grid[2:66, 2:66, 0]
    expected = np.kron(to_uint8(small[0, ..., 0]).numpy(), np.ones((4, 4), np.uint8))
    np.testing.assert_array_equal(tile, expected)
    large = rng.uniform(size=(2, 64, 64, 3)).astype(np.float32)
    assert image_grid(large, ncol=2, padding=0).shape == (64, 128, 3)
    path = str(tmp_path / "sub" / "grid.png")
    save_image_grid(small, path, ncol=3)
    np.testing.assert_array_equal(tf.io.decode_png(tf.io.read_file(path)).numpy(), grid)


def test_save_png_and_read_image_round_trip(tmp_path):
    image = (np.arange(4 * 6 * 3) % 256).astype(np.uint8).reshape(4, 6, 3)
    path = str(tmp_path / "a" / "b.png")
    save_png(path, image)
    np.testing.assert_allclose(read_image(path, (4, 6, 3)), image / 255.0, atol=1e-7)
    gray = read_image(path, (4, 6, 1))
    assert gray.shape == (4, 6, 1)
    with pytest.raises(ValueError, match="4x6 pixels, but the model makes 8x8"):
        read_image(path, (8, 8, 3))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(str(tmp_path / "missing.png"), (4, 6, 3))
