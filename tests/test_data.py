"""Tests of ncsn_tf.data: every source, the official preprocessing, augmentation and errors.

TFDS sources run under `tfds.testing.mock_data` (no downloads); folder and TFRecord data are
written by the tests. References are independent: PIL reproduces torchvision's
CenterCrop/Resize of the official code, NumPy the bilinear upsampling of the digits.
"""
import logging
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ncsn_tf import data
from ncsn_tf.config import presets


@pytest.fixture
def rng():
    return np.random.default_rng(1234)  # per test, so results do not depend on test order


def _config(dataset, image_size=32, channels=3, **fields):
    fields.setdefault("random_flip", False)
    return presets.override(presets.get("cifar10"), dataset=dataset, image_size=image_size,
                            channels=channels, **fields)


def _all(ds) -> np.ndarray:
    return np.stack([x.numpy() for x in ds])


def _bucket(keys) -> np.ndarray:
    """The documented split rule: test <=> FarmHash bucket 0 of 20."""
    return tf.strings.to_hash_bucket_fast(list(keys), 20).numpy()


def _train_names(n, ext, folder=""):
    """n file names that the documented rule puts in the train split when in `folder`."""
    names = [f"img{i:03d}.{ext}" for i in range(3 * n)]
    buckets = _bucket([folder + name for name in names])
    return [name for name, b in zip(names, buckets) if b != 0][:n]


def _write_png(path, image):
    tf.io.write_file(str(path), tf.io.encode_png(image))


# ---- the official transforms, through PIL as torchvision applies them ----

def _pil_center_crop(pil, size):
    w, h = pil.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return pil.crop((left, top, left + size, top + size))


def _official(image, size, crop=None):
    """[CenterCrop(crop),] Resize(size), CenterCrop(size) on a PIL image, as uint8."""
    pil_image = pytest.importorskip("PIL.Image")
    pil = pil_image.fromarray(image.squeeze())
    if crop:
        pil = _pil_center_crop(pil, crop)
    w, h = pil.size
    new = (int(size * w / h), size) if h <= w else (size, int(size * h / w))
    return np.asarray(_pil_center_crop(pil.resize(new, pil_image.BILINEAR), size))


# ---- digits ----

def _upsample2x(x):
    """Bilinear 2x upsampling along the last two axes, half-pixel centers, edges clamped."""
    for axis in (-2, -1):
        n = x.shape[axis]
        src = (np.arange(2 * n) + 0.5) / 2 - 0.5
        lo = np.floor(src).astype(int)
        frac = src - lo
        a = np.take(x, np.clip(lo, 0, n - 1), axis=axis)
        b = np.take(x, np.clip(lo + 1, 0, n - 1), axis=axis)
        shape = [1] * x.ndim
        shape[axis] = 2 * n
        x = a * (1 - frac.reshape(shape)) + b * frac.reshape(shape)
    return x


def test_digits_splits_match_sklearn_upsampled():
    from sklearn.datasets import load_digits
    digits = load_digits().images / 16.0
    config = presets.get("digits")
    assert data.eval_split(config) == "test"

    test = _all(data.load(config, "test", training=False))
    assert test.shape == (197, 16, 16, 1) and test.dtype == np.float32
    np.testing.assert_allclose(test[..., 0], _upsample2x(digits[1600:]), atol=1e-6)
    batches = list(data.load(config, "train", training=False, batch_size=500))
    assert [len(b) for b in batches] == [500, 500, 500, 100]  # the last partial batch is kept
    train = np.concatenate(batches)
    np.testing.assert_allclose(train[..., 0], _upsample2x(digits[:1600]), atol=1e-6)
    assert train.min() >= 0.0 and train.max() <= 1.0


def test_training_batches_repeat_and_drop_remainder():
    config = presets.get("digits")
    train = data.load(config, batch_size=64, deterministic=True)
    assert train.element_spec.shape == (64, 16, 16, 1)  # static batch size: no remainder
    batches = list(train.take(30))  # 1920 images: more than one epoch of 1600
    assert all(b.shape == (64, 16, 16, 1) for b in batches)
    rgb = presets.override(config, channels=3)
    batch = next(iter(data.load(rgb, batch_size=8)))
    assert batch.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(batch[..., 0], batch[..., 2])


def test_training_order_is_a_fresh_permutation_every_epoch():
    """As the official trainer's DataLoader(shuffle=True): each epoch (25 batches of 64 for the
    1,600 training digits) shows every image exactly once, in a new order each epoch."""
    config = presets.get("digits")
    images = _all(data.load(config, "train", training=False)).reshape(1600, -1)
    index = {row.tobytes(): i for i, row in enumerate(images)}
    assert len(index) == 1600  # the digits are distinct, so pixels identify them
    # deterministic: the default lets parallel batching hand out batches a little out of
    # order, which moves a few images across the epoch boundary.
    batches = data.load(config, batch_size=64, seed=3, deterministic=True).take(75)
    order = np.array([index[row.tobytes()] for b in batches for row in b.numpy().reshape(64, -1)])
    epochs = order.reshape(3, 1600)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(1600))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Well mixed: the first batch of an epoch is spread over the whole split, not a block.
    assert np.std(epochs[0][:64]) > 300


def test_random_flip_mirrors_about_half_the_images():
    config = presets.override(presets.get("digits"), random_flip=True)
    originals = _all(data.load(config, "test", training=False))
    index = {x.tobytes(): ("kept", i) for i, x in enumerate(originals)}
    index.update({x[:, ::-1].tobytes(): ("flipped", i) for i, x in enumerate(originals)
                  if not np.array_equal(x, x[:, ::-1])})
    seen = [index.get(x.tobytes()) for x in
            _all(data.load(config, "test", batch_size=40, deterministic=True).take(20))
            .reshape(-1, 16, 16, 1)]
    assert None not in seen  # every output is an original or its mirror image
    flipped = sum(kind == "flipped" for kind, _ in seen)
    assert 0.4 * len(seen) < flipped < 0.6 * len(seen)  # 800 fair coins: sd ~ 1.8%

    no_flip = presets.override(config, random_flip=False)
    outputs = _all(data.load(no_flip, "test", batch_size=40).take(10)).reshape(-1, 16, 16, 1)
    assert all(index[x.tobytes()][0] == "kept" for x in outputs)


# ---- folder ----

def test_uniform_dequantization(tmp_path):
    levels = [0, 40, 128, 200, 255]
    for name, k in zip(_train_names(len(levels), "png"), levels):
        _write_png(tmp_path / name, np.full((32, 32, 3), k, np.uint8))
    config = _config(f"folder:{tmp_path}", uniform_dequantization=True)

    plain = _all(data.load(presets.override(config, uniform_dequantization=False),
                           training=False))
    np.testing.assert_array_equal(plain, np.float32(levels)[:, None, None, None] / 255
                                  * np.ones_like(plain))
    images = _all(data.load(config, batch_size=5, deterministic=True).take(4)).reshape(
        -1, 32, 32, 3).astype(np.float64)
    assert images.min() >= 0.0 and images.max() < 1.0
    for y in images:
        k = round(float(np.mean(y * 256)) - 0.5)  # which level this image came from
        assert k in levels
        noise = y * 256 - k  # (255 x + u) / 256 with x = k / 255 gives u
        assert noise.min() > -1e-4 and noise.max() < 1 + 1e-4
        assert abs(noise.mean() - 0.5) < 0.05 and noise.min() < 0.01 and noise.max() > 0.99


def test_deterministic_gives_the_same_order_twice(tmp_path, rng):
    for name in _train_names(12, "png"):
        _write_png(tmp_path / name, rng.integers(0, 256, (32, 32, 3), np.uint8))
    config = _config(f"folder:{tmp_path}", random_flip=True, uniform_dequantization=True)

    def run(seed):
        return _all(data.load(config, batch_size=4, seed=seed, deterministic=True).take(9))

    first = run(3)
    np.testing.assert_array_equal(first, run(3))
    assert not np.array_equal(first, run(4))
    # 9 batches of 4 span 3 epochs of 12 images: each epoch is a permutation of the files
    means = np.sort(first.reshape(3, 12, -1).mean(axis=-1), axis=1)
    np.testing.assert_allclose(means[0], means[1], atol=2e-3)


def test_folder_resize_and_crop_match_the_official_transform(tmp_path, rng):
    # landscape, portrait, exact, upsampled, and a 3-pixel margin (torchvision rounds 1.5 to 2)
    shapes = [(40, 60), (50, 30), (32, 32), (20, 24), (32, 35)]
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in shapes]
    names = _train_names(len(images), "png", folder="sub/")
    for name, image in zip(names, images):
        _write_png(tmp_path / "sub" / name, image)
    outputs = _all(data.load(_config(f"folder:{tmp_path}"), training=False))  # sorted paths
    assert outputs.shape == (5, 32, 32, 3)
    for image, out in zip(images, outputs):
        expected = _official(image, 32).astype(np.float32) / 255
        np.testing.assert_allclose(out, expected, atol=1.01 / 255)
    np.testing.assert_array_equal(outputs[2], images[2] / np.float32(255))


def test_folder_channels(tmp_path, rng):
    gray = rng.integers(0, 256, (32, 32, 1), np.uint8)
    rgb = rng.integers(0, 256, (32, 32, 3), np.uint8)
    first, second = _train_names(2, "png")
    _write_png(tmp_path / first, gray)
    _write_png(tmp_path / second, rgb)
    as_gray = _all(data.load(_config(f"folder:{tmp_path}", channels=1), training=False))
    assert as_gray.shape == (2, 32, 32, 1)
    np.testing.assert_array_equal(as_gray[0], gray / np.float32(255))
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]  # ITU-R 601, as PIL's "L"
    np.testing.assert_allclose(as_gray[1, ..., 0], luma / 255, atol=1.01 / 255)
    as_rgb = _all(data.load(_config(f"folder:{tmp_path}", channels=3), training=False))
    np.testing.assert_array_equal(as_rgb[0], np.repeat(gray, 3, axis=-1) / np.float32(255))


def test_folder_skips_and_counts_unreadable_files(tmp_path, caplog, rng):
    pil_image = pytest.importorskip("PIL.Image")
    good = {}
    for ext, fmt in [("png", "PNG"), ("jpg", "JPEG"), ("jpeg", "JPEG"), ("gif", "GIF"),
                     ("bmp", "BMP"), ("PNG", "PNG")]:
        name = _train_names(1, ext, folder=f"nested/{ext}/")[0]
        path = tmp_path / "nested" / ext / name
        path.parent.mkdir(parents=True)
        image = rng.integers(0, 256, (24, 24, 3), np.uint8)
        pil_image.fromarray(image).save(path, format=fmt)
        good[str(path)] = image
    jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (24, 24, 3), np.uint8)).numpy()
    bad = {_train_names(1, "png")[0]: b"definitely not a png",
           _train_names(1, "jpg")[0]: jpeg[: len(jpeg) // 2]}  # truncated
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "notes.txt").write_text("not an image")

    config = _config(f"folder:{tmp_path}", image_size=24)
    with caplog.at_level(logging.WARNING, logger="ncsn_tf.data"):
        outputs = _all(data.load(config, training=False))
        list(data.load(config, batch_size=2).take(12))  # 4 epochs: must not crash
    assert len(outputs) == len(good)
    for path, out in zip(sorted(good), outputs):
        if path.endswith(("png", "PNG", "bmp")):  # lossless formats decode exactly
            np.testing.assert_array_equal(out, good[path] / np.float32(255))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipped 1 file(s) that are not" in m and "notes.txt" in m for m in messages) == 2
    unreadable = [m for m in messages if "not a readable PNG/JPEG/GIF/BMP image" in m]
    assert len(unreadable) == 4  # each bad file once per pipeline, two pipelines
    assert {m.split("(")[-1] for m in unreadable} == {"1 skipped so far)", "2 skipped so far)"}
    assert all(any(name in m for m in unreadable) for name in bad)


def test_folder_of_only_unreadable_files_fails_instead_of_spinning(tmp_path):
    for name in _train_names(3, "png"):
        (tmp_path / name).write_bytes(b"junk")
    start = time.monotonic()
    with pytest.raises(tf.errors.OpError, match="none of its 3 image files could be decoded"):
        next(iter(data.load(_config(f"folder:{tmp_path}"), batch_size=2)))
    assert time.monotonic() - start < 10


def test_folder_split_is_a_deterministic_hash_of_the_relative_path(tmp_path):
    names = [f"d{i % 3}/x{i}.png" for i in range(60)]
    for i, name in enumerate(names):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _write_png(tmp_path / name, np.full((8, 8, 1), i, np.uint8))
    config = _config(f"folder:{tmp_path}", image_size=8, channels=1)
    expected_test = {i for i, b in enumerate(_bucket(names)) if b == 0}
    assert 0 < len(expected_test) < 60
    test = {int(round(x[0, 0, 0] * 255)) for x in _all(data.load(config, "test", training=False))}
    train = {int(round(x[0, 0, 0] * 255)) for x in _all(data.load(config, "train",
                                                                  training=False))}
    assert test == expected_test and train == set(range(60)) - expected_test


def test_folder_errors(tmp_path):
    with pytest.raises(data.MissingDataError, match="does not exist"):
        data.load(_config(f"folder:{tmp_path / 'nope'}"))
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(data.MissingDataError, match="No images .* found only 1 other"):
        data.load(_config(f"folder:{tmp_path}"))
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load(_config(f"folder:{tmp_path}"), "validation")


def test_sharding_by_input_context(tmp_path):
    def shard(config, split, i):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i)
        return _all(data.load(config, split, training=False, input_context=context))

    digits = presets.get("digits")
    whole = _all(data.load(digits, "test", training=False))
    parts = [shard(digits, "test", i) for i in range(2)]
    assert len(parts[0]) + len(parts[1]) == len(whole) == 197
    key = lambda x: x.tobytes()  # noqa: E731
    assert {key(x) for x in parts[0]}.isdisjoint({key(x) for x in parts[1]})
    assert {key(x) for p in parts for x in p} == {key(x) for x in whole}

    for i, name in enumerate(_train_names(7, "png")):
        _write_png(tmp_path / name, np.full((8, 8, 1), i, np.uint8))
    config = _config(f"folder:{tmp_path}", image_size=8, channels=1)
    values = [{int(round(x.max() * 255)) for x in shard(config, "train", i)} for i in range(2)]
    assert values[0].isdisjoint(values[1]) and values[0] | values[1] == set(range(7))


def test_distribute_datasets_from_function(tmp_path, rng):
    for name in _train_names(6, "png"):
        _write_png(tmp_path / name, rng.integers(0, 256, (16, 16, 3), np.uint8))
    config = _config(f"folder:{tmp_path}", image_size=16)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dist = strategy.distribute_datasets_from_function(lambda context: data.load(
        config, batch_size=context.get_per_replica_batch_size(8), input_context=context))
    batch = next(iter(dist))
    assert [x.shape for x in strategy.experimental_local_results(batch)] == [(4, 16, 16, 3)] * 2


# ---- TFRecords ----

def _feature(value):
    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=value))


def _write_records(path, examples):
    serialized = [tf.train.Example(features=tf.train.Features(
        feature={k: _feature(v) for k, v in ex.items()})).SerializeToString() for ex in examples]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in serialized:
            writer.write(record)
    return serialized


@pytest.mark.parametrize("key", ["image", "image/encoded"])
def test_tfrecord_encoded_images_and_split(tmp_path, key, rng):
    images = rng.integers(0, 256, (80, 8, 8, 3), np.uint8)
    records = []
    for f in range(2):
        records += _write_records(tmp_path / f"part-{f}.tfrecords", [
            {key: tf.io.encode_png(x).numpy()} for x in images[40 * f:40 * f + 40]])
    config = _config(f"tfrecord:{tmp_path}/*.tfrecords", image_size=8)
    test = _all(data.load(config, "test", training=False))
    train = _all(data.load(config, "train", training=False))
    expected_test = _bucket(records) == 0
    assert 0 < expected_test.sum() < 80
    np.testing.assert_array_equal(train, images[~expected_test] / np.float32(255))
    np.testing.assert_array_equal(test, images[expected_test] / np.float32(255))
    batch = next(iter(data.load(config, batch_size=8)))
    assert batch.shape == (8, 8, 8, 3)


def test_tfrecord_raw_chw_layout(tmp_path, rng):
    images = rng.integers(0, 256, (30, 20, 20, 3), np.uint8)
    _write_records(tmp_path / "ffhq-r04.tfrecords", [
        {"shape": [3, 20, 20], "data": np.transpose(x, (2, 0, 1)).tobytes()} for x in images])
    config = _config(f"tfrecord:{tmp_path}/ffhq-*.tfrecords", image_size=20)
    outputs = np.concatenate([_all(data.load(config, s, training=False)) for s in ("train",
                                                                                  "test")])
    expected = {x.tobytes() for x in images / np.float32(255)}
    assert len(outputs) == 30 and {x.tobytes() for x in outputs} == expected
    small = _all(data.load(presets.override(config, image_size=10, channels=1),
                           training=False))
    assert small.shape[1:] == (10, 10, 1)

    gray = rng.integers(0, 256, (4, 20, 20, 1), np.uint8)
    _write_records(tmp_path / "gray.tfrecords", [
        {"shape": [1, 20, 20], "data": x.tobytes()} for x in gray])
    config = _config(f"tfrecord:{tmp_path}/gray.tfrecords", image_size=20, channels=1)
    outputs = [x.numpy() for s in ("train", "test") for x in data.load(config, s,
                                                                        training=False)]
    assert {x.tobytes() for x in outputs} == {x.tobytes() for x in gray / np.float32(255)}


def test_tfrecord_errors(tmp_path):
    with pytest.raises(data.MissingDataError, match="No TFRecord files match"):
        data.load(_config(f"tfrecord:{tmp_path}/*.tfrecords"))
    _write_records(tmp_path / "odd.tfrecords", [{"pixels": b"123"}])
    with pytest.raises(ValueError, match=r"features \['pixels'\].*'shape'"):
        data.load(_config(f"tfrecord:{tmp_path}/*.tfrecords"))


def _frames(path) -> list[int]:
    """Byte offsets at which the records of a TFRecord file start (length, crc, data, crc)."""
    raw, starts, offset = path.read_bytes(), [], 0
    while offset < len(raw):
        starts.append(offset)
        offset += int(np.frombuffer(raw[offset:offset + 8], "<u8")[0]) + 16
    return starts


@pytest.mark.parametrize("damage", ["cut_in_header", "cut_in_data", "bit_flip"])
def test_damaged_tfrecord_file_stops_the_pipeline_naming_it(tmp_path, rng, damage):
    images = rng.integers(0, 256, (40, 8, 8, 3), np.uint8)
    path = tmp_path / "part-0.tfrecords"
    _write_records(path, [{"image": tf.io.encode_png(x).numpy()} for x in images])
    raw, start = bytearray(path.read_bytes()), _frames(path)[30]
    if damage == "bit_flip":
        raw[start + 20] ^= 0xFF
    else:  # a copy or a writer cut short inside the length header or the data of record 30
        del raw[start + (5 if damage == "cut_in_header" else 20):]
    path.write_bytes(bytes(raw))
    # TFRecordDataset alone reads a header cut short as the end of the file: nothing said.
    if damage == "cut_in_header":
        assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) == 30
    config = _config(f"tfrecord:{tmp_path}/*.tfrecords", image_size=8)
    with pytest.raises(tf.errors.OpError) as error:
        _all(data.load(config, training=False))
    assert data.bad_data_message(error.value) == (
        f"TFRecord file {path} is cut short or corrupt after record 30 (byte {start} of "
        f"{len(raw)}). Re-write or remove it and re-run.")


def test_tfrecord_record_that_is_no_image_stops_the_pipeline_naming_it(tmp_path, rng):
    good = tf.io.encode_png(rng.integers(0, 256, (8, 8, 3), np.uint8)).numpy()
    path = tmp_path / "part-0.tfrecords"
    _write_records(path, [{"image": good}] * 3 + [{"image": b"not an image at all, really"}])
    with pytest.raises(tf.errors.OpError) as error:
        _all(data.load(_config(f"tfrecord:{path}", image_size=8), "train", training=False))
        _all(data.load(_config(f"tfrecord:{path}", image_size=8), "test", training=False))
    assert data.bad_data_message(error.value).startswith(
        f"record 3 of {path} is not a PNG/JPEG/GIF/BMP image")


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_PIXELS", 64 * 64)
    for name, shape in zip(_train_names(2, "png"), [(64, 64, 3), (64, 65, 3)]):
        tf.io.write_file(str(tmp_path / name), tf.io.encode_png(np.zeros(shape, np.uint8)))
    pil_image = pytest.importorskip("PIL.Image")
    for fmt in ("jpg", "bmp", "gif"):
        name = _train_names(1, fmt)[0]
        pil_image.fromarray(np.zeros((70, 70, 3), np.uint8)).save(tmp_path / name)
    headers = {p.name: int(data._header_pixels(tf.io.read_file(str(p))))
               for p in tmp_path.iterdir()}
    assert sorted(headers.values()) == [64 * 64, 64 * 65, 70 * 70, 70 * 70, 70 * 70]
    outputs = _all(data.load(_config(f"folder:{tmp_path}", image_size=8), training=False))
    assert len(outputs) == 1  # the 64x64 PNG; the others are skipped and named


# ---- TFDS (mocked) ----

@pytest.fixture
def online(monkeypatch):
    """Pretend the dataset hosts answer; mock_data turns download_and_prepare into a no-op."""
    monkeypatch.setattr(data, "_reachable", lambda url, timeout=3.0: True)


@pytest.mark.parametrize("preset,shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1)),
                                          ("celeb_a", (64, 64, 3)),
                                          ("lsun_church_outdoor", (96, 96, 3))])
def test_tfds_sources_shapes_and_ranges(online, preset, shape):
    config = presets.get(preset)
    with tfds.testing.mock_data(num_examples=5):
        batch = next(iter(data.load(config, batch_size=4, deterministic=True)))
        held_out = _all(data.load(config, data.eval_split(config), training=False))
    assert batch.shape == (4, *shape) and batch.dtype == tf.float32
    assert held_out.shape == (5, *shape)
    for x in (batch.numpy(), held_out):
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.01
    np.testing.assert_allclose(held_out * 255, np.round(held_out * 255), atol=1e-3)  # 8-bit


def _mock_images(images):
    """mock_data whose as_dataset yields `images` (encoded, as TFDS stores them)."""
    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        skip = isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding)
        return tf.data.Dataset.from_tensor_slices(
            {"image": [tf.io.encode_png(x).numpy() for x in images]} if skip
            else {"image": np.stack(images)})
    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_celeb_a_center_crop_140_then_resize(online, rng):
    face = rng.integers(0, 256, (218, 178, 3), np.uint8)  # the aligned CelebA size
    config = presets.get("celeb_a")
    with _mock_images([face]):
        out = _all(data.load(config, "test", training=False))[0]
    expected = _official(face, 64, crop=140)  # CenterCrop(140), Resize(64) as the official
    np.testing.assert_allclose(out, expected / np.float32(255), atol=1.01 / 255)
    # the crop is rows 39..178, columns 19..158: one row lower gives a different image
    shifted = _official(face[2:], 64, crop=140)  # crops rows 40..179
    assert np.abs(out - shifted / 255).max() > 10 / 255


def test_lsun_resize_short_side_then_center_crop(online, rng):
    scene = rng.integers(0, 256, (100, 150, 3), np.uint8)
    config = presets.get("lsun_church_outdoor")
    assert data.eval_split(config) == "validation"
    with _mock_images([scene]):
        out = _all(data.load(config, "validation", training=False))[0]
    np.testing.assert_allclose(out, _official(scene, 96) / np.float32(255), atol=1.01 / 255)


def test_missing_tfds_data_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_reachable", lambda url, timeout=3.0: False)
    config = presets.override(presets.get("celeb_a"), data_dir=str(tmp_path))
    start = time.monotonic()
    with pytest.raises(data.MissingDataError) as error:
        data.load(config)
    assert time.monotonic() - start < 10
    message = str(error.value)
    for name in ("img_align_celeba.zip", "list_eval_partition.txt", "list_attr_celeba.txt",
                 "list_landmarks_align_celeba.txt", "identity_CelebA.txt"):
        assert name in message
    assert os.path.join(str(tmp_path), "downloads", "manual") in message
    assert "no network connection" in message and "tfds build celeb_a" in message


def test_failed_download_is_reported_with_instructions(tmp_path, monkeypatch, online):
    def fail(self, *args, **kwargs):
        raise ConnectionError("quota exceeded")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    config = presets.override(presets.get("lsun_bedroom"), data_dir=str(tmp_path))
    with pytest.raises(data.MissingDataError,
                       match="(?s)ConnectionError: quota exceeded.*bedroom_train_lmdb.zip"):
        data.load(config)


def test_dataset_name_errors():
    with pytest.raises(ValueError, match="tfrecord:GLOB"):
        data.load(presets.get("ffhq"))
    with pytest.raises(ValueError, match="Valid forms: cifar10, mnist, celeb_a, lsun/"):
        data.load(_config("imagenet"))
    with pytest.raises(ValueError, match="church_outdoor"):
        data.load(_config("lsun/moon"))
    with pytest.raises(ValueError, match="needs a path"):
        data.load(_config("folder:"))
    with pytest.raises(ValueError, match="channels 1 or 3"):
        data.load(presets.override(presets.get("digits"), channels=2))
    assert [data.eval_split(presets.get(p)) for p in ("cifar10", "celeb_a", "mnist")] == [
        "test"] * 3
