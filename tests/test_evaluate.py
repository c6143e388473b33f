"""Feature networks, FID/IS over every sample source (files, folders, checkpoints, SavedModels),
cached reference statistics, neighbours, fast FID sweeps over checkpoints."""
import csv
import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import app as absl_app
from absl import flags as absl_flags

from ncsn_tf import evaluate, evaluation, serving, models
from ncsn_tf.training import checkpoints
from ncsn_tf.evaluation import inception, metrics
from ncsn_tf.config import presets
from ncsn_tf import sampling
from ncsn_tf import images as image_io

UNREACHABLE = "http://127.0.0.1:1/unreachable"  # connection refused at once, even when online


def smooth_images(n, shift=0.0, seed=0, size=16):
    """A distribution of images: random mixtures of 4 smooth patterns plus pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    patterns = np.stack([np.sin(2 * np.pi * (a * xx + b * yy)) for a, b in
                         [(1, 0), (0, 1), (1, 1), (2, 1)]])
    coefficients = rng.normal(size=(n, 4, 3)) * 0.15
    images = (0.5 + shift + np.einsum("nkc,khw->nhwc", coefficients, patterns)
              + rng.normal(size=(n, size, size, 3)) * 0.05)
    return np.clip(images, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def net():
    return inception.random_test_network()


@pytest.fixture(scope="module")
def reference(net):
    mu, sigma, count = evaluation.dataset_statistics(smooth_images(400, seed=1), net)
    assert count == 400
    return mu, sigma


# --- feature networks -------------------------------------------------------------------------

def test_random_network_is_seeded_and_labelled_as_not_inception(net):
    images = smooth_images(4)
    features, logits = net(images)
    assert features.shape == (4, 128) and logits.shape == (4, 10)
    np.testing.assert_array_equal(features, inception.random_test_network(seed=0)(images)[0])
    assert not np.allclose(features, inception.random_test_network(seed=1)(images)[0])
    assert "NOT Inception" in net.name


def test_float_grey_and_uint8_inputs_give_the_same_features(net):
    uint8 = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(net(uint8)[0], net(uint8 / 255.0)[0])
    grey = uint8[..., :1]
    np.testing.assert_array_equal(net(grey)[0], net(np.repeat(grey, 3, axis=-1))[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        net(uint8 / 127.5 - 1.0)
    with pytest.raises(ValueError, match="1 or 3"):
        net(np.zeros((2, 8, 8, 4), np.uint8))


def test_unknown_network_spec_lists_the_choices():
    with pytest.raises(ValueError, match="tfgan:PATH"):
        inception.load_feature_network("inception-v9")


def test_tfgan_inception_offline_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setattr(inception, "TFGAN_INCEPTION_URL", UNREACHABLE)
    start = time.perf_counter()
    with pytest.raises(inception.FeatureNetworkUnavailable) as error:
        inception.load_feature_network("tfgan", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "tf-hub-format=compressed" in message and "--inception=tfgan:" in message
    assert str(tmp_path / "tfgan_eval_inception_1") in message
    assert os.listdir(tmp_path) == []  # no partial download left behind
    with pytest.raises(inception.FeatureNetworkUnavailable, match="saved_model.pb"):
        inception.load_feature_network(f"tfgan:{tmp_path / 'nothing here'}")


def test_keras_inception_offline_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setattr(inception, "KERAS_INCEPTION_URL", UNREACHABLE)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(inception.FeatureNetworkUnavailable) as error:
        inception.load_feature_network("keras")
    assert "--inception=keras:" in str(error.value)
    assert str(tmp_path / "models") in str(error.value)
    with pytest.raises(inception.FeatureNetworkUnavailable, match="No InceptionV3 weights"):
        inception.load_feature_network(f"keras:{tmp_path / 'missing.h5'}")


class _FakeInception(tf.Module):
    """Stands in for the TF-GAN module: reports what it was fed (range, size) as its pool_3."""

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, x):
        shape = tf.shape(x)
        seen = tf.stack([tf.reduce_min(x, [1, 2, 3]), tf.reduce_max(x, [1, 2, 3]),
                         tf.cast(tf.fill([shape[0]], shape[1]), tf.float32),
                         tf.cast(tf.fill([shape[0]], shape[2]), tf.float32)], axis=1)
        return {"pool_3": tf.reshape(seen, [-1, 1, 1, 4]), "logits": tf.ones([shape[0], 1008])}


@pytest.mark.parametrize("as_signature", [False, True])
def test_tfgan_inception_feeds_299px_images_in_minus_one_one(tmp_path, as_signature):
    module = _FakeInception()
    if as_signature:  # TF1-style export: only a 'default' signature, the object is not callable
        tf.saved_model.save(tf.Module(), str(tmp_path),
                            signatures={"default": module.__call__.get_concrete_function()})
    else:
        tf.saved_model.save(module, str(tmp_path))
    net = inception.load_feature_network(f"tfgan:{tmp_path}")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[0] = 255
    images[1, :16] = 51  # 51 / 127.5 - 1 = -0.6
    features, logits = net(images)
    np.testing.assert_allclose(features, [[1, 1, 299, 299], [-1, -0.6, 299, 299]], atol=1e-6)
    assert logits.shape == (2, 1008)
    assert "tfgan" in net.name and str(tmp_path) not in net.name  # the name is portable


def test_keras_inception_loads_a_weights_file_and_returns_pool_and_logits(tmp_path):
    import keras

    model = keras.applications.InceptionV3(weights=None, classifier_activation=None)
    weights = str(tmp_path / "random.weights.h5")
    model.save_weights(weights)
    net = inception.load_feature_network(f"keras:{weights}")
    images = np.random.default_rng(0).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    features, logits = net(images)
    resized = tf.image.resize(tf.cast(images, tf.float32), [299, 299], method="bilinear")
    expected = model(keras.applications.inception_v3.preprocess_input(resized)).numpy()
    assert features.shape == (1, 2048)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-6)
    assert "random.weights.h5" in net.name  # not claimed to be the ImageNet weights


# --- FID / IS ---------------------------------------------------------------------------------

def test_fid_grows_with_the_distribution_shift(net, reference):
    fids = [evaluation.compute_fid_is(smooth_images(400, shift, seed=2), net, reference)["fid"]
            for shift in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert fids[0] < 0.1 * fids[2]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_inception_score_of_random_network_matches_its_logits(net, reference):
    images = smooth_images(100, seed=3)
    result = evaluation.compute_fid_is(images, net, reference, batch_size=30)
    expected = metrics.inception_score(net(images)[1], splits=10)
    assert 1.0 <= result["inception_score"] <= 10.0
    assert result["inception_score"] == pytest.approx(expected[0], rel=1e-6)
    assert result["inception_score_std"] == pytest.approx(expected[1], rel=1e-5, abs=1e-9)
    assert result["network"] == net.name and result["num_images"] == 100


def test_every_sample_source_gives_the_same_scores(net, reference, tmp_path):
    images = smooth_images(60, seed=4)
    uint8 = np.round(images * 255).astype(np.uint8)
    np.savez(tmp_path / "nhwc.npz", samples=uint8, other=np.zeros(3))
    np.savez(tmp_path / "nchw.npz", uint8.transpose(0, 3, 1, 2))  # first array, NCHW
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(uint8):
        tf.io.write_file(str(folder / f"{i:03d}.png"), tf.io.encode_png(image))

    def generator():
        for i in range(0, 60, 25):
            yield images[i:i + 25]

    sources = [images, str(tmp_path / "nhwc.npz"), str(tmp_path / "nchw.npz"), str(folder),
               tf.data.Dataset.from_tensor_slices((images, np.zeros(60))).batch(16), generator()]
    results = [evaluation.compute_fid_is(s, net, reference, batch_size=20, splits=5)
               for s in sources]
    for result in results[1:]:
        assert result["num_images"] == 60
        assert result["fid"] == pytest.approx(results[0]["fid"], rel=1e-6)
        assert result["inception_score"] == pytest.approx(results[0]["inception_score"], rel=1e-6)


def test_a_folder_of_images_of_different_sizes_is_refused(net, reference, tmp_path):
    tf.io.write_file(str(tmp_path / "a.png"), tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)))
    tf.io.write_file(str(tmp_path / "b.png"), tf.io.encode_png(np.zeros((9, 8, 3), np.uint8)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="differ in size"):
        evaluation.compute_fid_is(str(tmp_path), net, reference)


def test_max_images_and_reference_statistics_by_path(net, reference, tmp_path):
    path = str(tmp_path / "ref.npz")
    metrics.save_statistics(path, *reference, network=net.name, num_images=400)
    images = smooth_images(50, seed=5)
    limited = evaluation.compute_fid_is(images, net, path, batch_size=16, max_images=30)
    direct = evaluation.compute_fid_is(images[:30], net, reference)
    assert limited["num_images"] == 30 and limited["reference"] == path
    assert limited["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    metrics.save_statistics(path, *reference, network="another network", num_images=400)
    with pytest.raises(ValueError, match="another network"):
        evaluation.compute_fid_is(images, net, path)


def test_an_endless_dataset_needs_max_images(net, reference):
    endless = tf.data.Dataset.from_tensor_slices(smooth_images(8)).batch(4).repeat()
    with pytest.raises(ValueError, match="max_images"):
        evaluation.compute_fid_is(endless, net, reference)
    assert evaluation.compute_fid_is(endless, net, reference, max_images=20,
                                   splits=2)["num_images"] == 20


def test_reference_statistics_are_computed_once_then_read_from_the_cache(net, monkeypatch,
                                                                         tmp_path):
    images = smooth_images(90, seed=6)
    calls = []

    def load(config, split="train", *, training=True, batch_size=None, seed=0,
             deterministic=False):
        calls.append((config.data.dataset, split, training, batch_size))
        return tf.data.Dataset.from_tensor_slices(images).batch(batch_size)

    monkeypatch.setattr(evaluate.data, "load", load)
    config = presets.get("cifar10")
    cache = str(tmp_path / "stats" / "cifar10_train.npz")

    mu, sigma = evaluation.reference_statistics(config, net, cache, batch_size=32)
    assert calls == [("cifar10", "train", False, 32)]
    expected_mu, expected_sigma = metrics.statistics(net(images)[0])
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-5, atol=1e-9)

    cached_mu, cached_sigma = evaluation.reference_statistics(config, net, cache, batch_size=32)
    assert len(calls) == 1  # read from the cache, the dataset is not touched again
    np.testing.assert_array_equal(cached_mu, mu)
    np.testing.assert_array_equal(cached_sigma, sigma)
    with pytest.raises(ValueError, match="not of"):
        evaluation.reference_statistics(config, inception.random_test_network(seed=1), cache)


# --- nearest neighbours -----------------------------------------------------------------------

def test_nearest_neighbors_in_pixels_match_brute_force_across_batches():
    rng = np.random.default_rng(7)
    train = rng.uniform(size=(25, 6, 6, 3)).astype(np.float32)
    samples = np.stack([train[13], np.clip(train[3] + 0.01, 0, 1), rng.uniform(size=(6, 6, 3))])
    found = evaluation.nearest_neighbors(samples, train, k=4, flip=False, batch_size=7)
    distances = np.linalg.norm(samples.reshape(3, 1, -1) - train.reshape(1, 25, -1), axis=2)
    expected = np.argsort(distances, axis=1)[:, :4]
    np.testing.assert_array_equal(found.indices, expected)
    np.testing.assert_allclose(found.distances, np.take_along_axis(distances, expected, 1),
                               rtol=1e-5, atol=1e-6)
    assert found.indices[0, 0] == 13 and found.distances[0, 0] == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_array_equal(found.images, train[expected])
    assert found.space == "pixels"


def test_nearest_neighbors_match_mirrored_samples_only_with_flip():
    train = np.random.default_rng(8).integers(0, 256, size=(12, 5, 5, 1), dtype=np.uint8)
    mirrored = train[[7]][:, :, ::-1]
    with_flip = evaluation.nearest_neighbors(mirrored, train, k=1, flip=True, batch_size=5)
    without = evaluation.nearest_neighbors(mirrored, train, k=1, flip=False, batch_size=5)
    assert with_flip.indices[0, 0] == 7 and with_flip.distances[0, 0] == pytest.approx(0, abs=1e-6)
    assert without.distances[0, 0] > 0.1


def test_nearest_neighbors_in_feature_space(net):
    train = smooth_images(20, seed=9)
    found = evaluation.nearest_neighbors(train[[4, 11]], train, k=2, feature_net=net, batch_size=8)
    np.testing.assert_array_equal(found.indices[:, 0], [4, 11])
    np.testing.assert_allclose(found.distances[:, 0], 0.0, atol=1e-3)
    assert found.space == net.name
    with pytest.raises(ValueError, match="at least k"):
        evaluation.nearest_neighbors(train[:1], train[:3], k=5)


def test_neighbor_grid_png_places_samples_then_neighbours(tmp_path):
    rng = np.random.default_rng(10)
    samples = rng.uniform(size=(2, 4, 5, 3)).astype(np.float32)
    neighbours = rng.uniform(size=(2, 3, 4, 5, 3)).astype(np.float32)
    enlarged = evaluation.neighbor_grid(samples, neighbours, padding=1)
    assert enlarged.shape == (1 + 2 * 65, 1 + 3 + 4 * 81 - 1, 3)  # 4x5 px cells shown at 64x80
    np.testing.assert_array_equal(enlarged[1:65:16, 1:81:16], np.round(samples[0] * 255))
    grid = evaluation.neighbor_grid(samples, neighbours, padding=1, min_tile=0)
    # Cells of 4x5 px, 1 px apart; 3 px between the sample column and the neighbours:
    # rows start at y = 1, 6; columns at x = 1 | 9, 15, 21; total 11 x 27 px.
    assert grid.shape == (11, 27, 3)

    def uint8(x):
        return np.round(x * 255).astype(np.uint8)

    np.testing.assert_array_equal(grid[1:5, 1:6], uint8(samples[0]))
    np.testing.assert_array_equal(grid[6:10, 1:6], uint8(samples[1]))
    np.testing.assert_array_equal(grid[6:10, 9:14], uint8(neighbours[1, 0]))
    np.testing.assert_array_equal(grid[1:5, 21:26], uint8(neighbours[0, 2]))
    assert (grid[:, 6:9] == 255).all() and (grid[5] == 255).all()  # white gaps
    path = str(tmp_path / "out" / "nn.png")
    image_io.save_png(path, grid)
    np.testing.assert_array_equal(tf.io.decode_png(tf.io.read_file(path)).numpy(), grid)


# --- command line -----------------------------------------------------------------------------

def test_cli_computes_reference_statistics_fid_is_and_neighbours(net, tmp_path):
    """End to end on the offline `digits` preset: statistics cached, JSON report, PNG grid."""
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, samples=np.random.default_rng(11).uniform(size=(40, 16, 16, 1)))
    stats, report, grid = (str(tmp_path / name) for name in ("ref.npz", "report.json", "nn.png"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "ncsn_tf.evaluate", f"--samples={samples}", "--preset=digits",
         "--inception=random-test", f"--ref_stats={stats}", "--splits=4", f"--report={report}",
         "--nn_k=2", "--nn_samples=3", f"--nn_out={grid}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with open(report) as f:
        assert json.load(f) == result
    expected = evaluation.compute_fid_is(samples, net, stats, splits=4)  # refuses another network
    assert result["fid"] == pytest.approx(expected["fid"], rel=1e-6)
    assert result["inception_score"] == pytest.approx(expected["inception_score"], rel=1e-6)
    assert result["network"] == net.name and result["reference"] == stats
    assert result["nearest_neighbors"]["space"] == "pixels"
    assert os.path.exists(report[:-5] + "_worst.png")  # beside the report by default
    assert 0.0 <= result["precision"] <= 1.0 and result["kid_se"] > 0
    # 3 rows of (sample + 2 neighbours), 16 px cells shown at 64 px, 2 px apart, 6 px after
    # the samples.
    assert tf.io.decode_png(tf.io.read_file(grid)).shape == (2 + 3 * 66, 2 + 6 + 3 * 66 - 2, 1)


def test_streamed_manifold_metrics_equal_the_whole_array_computation(net):
    """ManifoldMetrics over batches (features capped at max_samples, realism for every
    sample) against the metrics of the whole arrays; the worst images are the samples'."""
    real = net(smooth_images(300, seed=3))[0]
    samples = np.concatenate([smooth_images(90, seed=4),
                              np.random.default_rng(5).uniform(size=(10, 16, 16, 3))])
    fake = net(samples)[0]
    manifold = evaluation.ManifoldMetrics(real, k=3, max_samples=80, num_worst=5)
    for start in range(0, 100, 30):
        manifold.update(samples[start:start + 30], fake[start:start + 30])
    result = manifold.result()
    assert (result["precision"], result["recall"]) == pytest.approx(
        metrics.precision_recall(real, fake[:80], 3))
    assert (result["kid"], result["kid_se"]) == pytest.approx(metrics.kid(real, fake[:80], 10))
    realism = metrics.realism_scores(real, fake, 3)
    order = np.argsort(realism, kind="stable")[:5]
    assert result["least_realistic"]["index"] == order.tolist()
    np.testing.assert_array_equal(manifold.worst_images(), samples[order])


# --- samples drawn from a model: checkpoints, SavedModels, fast FID sweeps --------------------
# Tracing a sampler costs seconds even for this tiny network, so each test traces few.

TINY = presets.override(presets.get("digits"), ngf=4, num_scales=3, n_steps_each=1,
                        sampling_batch_size=5)


def tiny_net(seed):
    keras.utils.set_random_seed(seed)
    return models.build(TINY)


def langevin(net, denoise):
    """What a checkpoint of `net` should draw: the library sampler, traced once, called with
    all seeds in one batch (the code under test draws in other batch sizes)."""
    sampler = sampling.AnnealedLangevin.from_config(
        lambda x, labels: net(x, labels, training=False), net.sigmas,
        presets.override(TINY, denoise=denoise))
    return lambda seeds: image_io.to_uint8(
        sampler.sample(np.asarray(seeds, np.int64))["samples"]).numpy()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A workdir at step 100 whose EMA network differs from its live one, and the EMA
    network's sampler without the final denoising step."""
    workdir = str(tmp_path_factory.mktemp("run"))
    net, ema_net = tiny_net(0), tiny_net(1)
    checkpoints.save_converted(workdir, TINY, net, ema_net, 100)
    x, labels = tf.random.uniform([2, 16, 16, 1], seed=0), tf.constant([0, 2])
    assert not np.allclose(net(x, labels), ema_net(x, labels))
    return workdir, ema_net, langevin(ema_net, denoise=False)


@pytest.fixture(scope="module")
def grey_reference(net, tmp_path_factory):
    """Statistics of 16x16 grey images under the random network, as a file."""
    path = str(tmp_path_factory.mktemp("stats") / "grey.npz")
    images = smooth_images(200, seed=12)[..., :1]
    mu, sigma, count = evaluation.dataset_statistics(images, net)
    metrics.save_statistics(path, mu, sigma, network=net.name, num_images=count)
    return path


def run_cli(args, capsys):
    """`python -m ncsn_tf.evaluate ARGS` in this process; returns its JSON result."""
    fv = absl_flags.FlagValues()
    evaluate.define_flags(fv)
    evaluate.main(fv(["evaluate", "--inception=random-test", *args]), fv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_fid_of_a_checkpoint_equals_fid_of_its_samples_saved_to_npz(net, tiny_run, tmp_path,
                                                                     capsys):
    """--workdir: EMA weights, seeds from --seed, sampler flags, reference statistics from
    the model's own dataset (digits, cached), the drawn images saved, nearest neighbours."""
    workdir, _, draw = tiny_run
    stats, saved = str(tmp_path / "digits_train.npz"), str(tmp_path / "drawn.npz")
    result = run_cli([f"--workdir={workdir}", f"--ref_stats={stats}", "--num_samples=12",
                      "--seed=3", "--nodenoise", "--splits=2", f"--save_samples={saved}",
                      "--nn_k=2", "--nn_samples=3", f"--nn_out={tmp_path / 'nn.png'}",
                      f"--worst_out={tmp_path / 'worst.png'}", "--num_worst=4"], capsys)
    expected = draw(np.arange(3, 15))
    with np.load(saved) as arrays:
        np.testing.assert_array_equal(arrays["samples"], expected)
        np.testing.assert_array_equal(arrays["seeds"], np.arange(3, 15))

    train = np.concatenate([batch.numpy() for batch in evaluate.data.load(
        TINY, "train", training=False, batch_size=500)])
    mu, sigma = metrics.statistics(net(train)[0])
    cached_mu, cached_sigma = metrics.load_statistics(stats, network=net.name)
    np.testing.assert_allclose(cached_mu, mu, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(cached_sigma, sigma, rtol=1e-4, atol=1e-8)

    np.savez(tmp_path / "own.npz", samples=expected)
    own = evaluation.compute_fid_is(str(tmp_path / "own.npz"), net, stats, splits=2)
    assert result["fid"] == pytest.approx(own["fid"], rel=1e-6)
    assert result["inception_score"] == pytest.approx(own["inception_score"], rel=1e-6)
    assert result["num_images"] == 12 and result["network"] == net.name
    assert result["reference"] == stats
    assert result["model"] == {"source": workdir, "step": 100, "seed": 3, "n_steps_each": 1,
                               "step_lr": TINY.sampling.step_lr, "denoise": False,
                               "num_scales": 3, "data_init": False, "sampler": "ald",
                               "nfe": 3}
    # Precision, recall, KID and the least realistic samples, against the whole training
    # split's features, computed here on the whole arrays at once.
    real, fake = net(train)[0], net(expected)[0]
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert (result["precision"], result["recall"]) == pytest.approx((precision, recall))
    # 12 samples: 6 disjoint subsets of 2 (at most 10 subsets, each of at least 2).
    assert (result["kid"], result["kid_se"]) == pytest.approx(metrics.kid(real, fake, 6))
    realism = metrics.realism_scores(real, fake, k=3)
    worst = result["least_realistic"]
    assert worst["index"] == np.argsort(realism, kind="stable")[:4].tolist()
    assert worst["realism"] == pytest.approx(np.sort(realism)[:4])
    assert worst["png"] == str(tmp_path / "worst.png")
    assert tf.io.decode_png(tf.io.read_file(worst["png"])).shape == (2 + 66, 2 + 4 * 66, 1)
    neighbours = evaluation.nearest_neighbors(expected[:3], train, 2)
    assert result["nearest_neighbors"]["min_distance"] == pytest.approx(
        float(neighbours.distances[:, 0].min()), rel=1e-5)


def test_saved_model_draws_the_checkpoints_samples(net, tiny_run, grey_reference, tmp_path):
    _, ema_net, draw = tiny_run
    config = presets.override(TINY, n_steps_each=1, denoise=False)
    path = serving.export(ema_net, config, 100, str(tmp_path), "tiny",
                          limits=serving.ServingLimits(max_batch=4))
    model = evaluation.load_saved_model(path)
    kept = []
    result = evaluation.model_fid_is(model, net, grey_reference, num_samples=9, batch_size=5,
                                   seed=3, splits=3, keep=kept)  # calls of 4 + 1, then 4
    expected = draw(np.arange(3, 12))
    np.testing.assert_array_equal(np.concatenate(kept), expected)
    assert result["fid"] == pytest.approx(
        evaluation.compute_fid_is(expected, net, grey_reference, splits=3)["fid"], rel=1e-6)
    assert result["model"]["step"] == 100 and result["model"]["source"] == path
    # A sampler setting goes through `sample_with_settings`.
    larger_steps = evaluation.load_saved_model(path, step_lr=4 * TINY.sampling.step_lr)
    assert larger_steps.sampler["step_lr"] == pytest.approx(4 * TINY.sampling.step_lr)
    assert not np.array_equal(larger_steps.sample_fn(np.arange(3, 7)), expected[:4])
    with pytest.raises(FileNotFoundError, match="ncsn_tf.export"):
        evaluation.load_saved_model(str(tmp_path))


def read_scalars(log_dir):
    """{tag: {step: value}} of the TensorBoard event files in `log_dir`."""
    scalars = {}
    for path in tf.io.gfile.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(
                    tf.make_ndarray(value.tensor))
    return scalars


def test_fast_fid_sweep_scores_every_checkpoint(net, grey_reference, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    checkpoints.write_config(workdir, TINY)
    live_net, ema_net, step_variable = tiny_net(2), tiny_net(3), tf.Variable(0, dtype=tf.int64)
    manager = checkpoints.make_manager(
        workdir, checkpoints.make_checkpoint(live_net, ema_net, step_variable), max_to_keep=2)
    draw = langevin(ema_net, denoise=True)
    rng = np.random.default_rng(13)
    expected = {}
    for step in (10, 15, 20):  # ckpt-10 survives only in kept/, 20 is in both places
        for w in ema_net.trainable_weights:
            w.assign(w + 0.3 * rng.normal(size=w.shape).astype(np.float32))
        step_variable.assign(step)
        checkpoints.save(manager, step, keep_every=10)
        expected[step] = evaluation.compute_fid_is(draw(np.arange(6)), net, grey_reference,
                                                 splits=2)
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "ckpt-10.index"))
    assert [s for s, _ in checkpoints.checkpoint_prefixes(workdir, 11, 20)] == [15, 20]
    assert [s for s, _ in checkpoints.checkpoint_prefixes(workdir, end_step=14)] == [10]

    result = run_cli([f"--sweep_workdir={workdir}", f"--ref_stats={grey_reference}",
                      "--num_samples=6", "--sampling_batch_size=4", "--splits=2"], capsys)
    with open(os.path.join(workdir, "fast_fid.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [10, 15, 20]
    assert list(rows[0]) == ["step", "fid", "inception_score", "num_samples", "network"]
    for row in rows:
        step = int(row["step"])
        assert float(row["fid"]) == pytest.approx(expected[step]["fid"], rel=1e-6)
        assert float(row["inception_score"]) == pytest.approx(
            expected[step]["inception_score"], rel=1e-6)
        assert row["num_samples"] == "6" and row["network"] == net.name
    assert len({row["fid"] for row in rows}) == 3
    best = min(expected, key=lambda step: expected[step]["fid"])
    assert result["best"]["step"] == best and len(result["checkpoints"]) == 3

    scalars = read_scalars(os.path.join(workdir, "tensorboard", "fast_fid"))
    assert set(scalars) == {"fast_fid/fid", "fast_fid/inception_score"}
    for step in expected:
        assert scalars["fast_fid/fid"][step] == pytest.approx(expected[step]["fid"], rel=1e-6)
        assert scalars["fast_fid/inception_score"][step] == pytest.approx(
            expected[step]["inception_score"], rel=1e-6)
    with pytest.raises(SystemExit, match=r"\[11, 14\]; steps there: \[10, 15, 20\]"):
        run_cli([f"--sweep_workdir={workdir}", f"--ref_stats={grey_reference}",
                 "--begin_step=11", "--end_step=14"], capsys)


@pytest.mark.parametrize("args, message", [
    (["--samples=a.npz", "--workdir=run"], "exactly one of"),
    ([], "exactly one of"),
    (["--workdir=run", "--preset=cifar10"], "brings its own config"),
    (["--samples=a.npz", "--ref_stats=s.npz", "--num_samples=10"],
     "--num_samples goes only with --workdir or --checkpoint or --saved_model or "
     "--sweep_workdir"),
    (["--workdir=run", "--begin_step=5"], "--begin_step goes only with --sweep_workdir"),
    (["--sweep_workdir=run", "--nn_k=3"], "--nn_k goes only with --samples or --workdir"),
    (["--checkpoint=run", "--num_samples=1"], ">= 2"),
])
def test_cli_refuses_contradictory_flags(args, message, capsys):
    with pytest.raises(absl_app.UsageError, match=message):
        run_cli(args, capsys)


def test_a_request_that_cannot_fit_is_refused_before_sampling(tiny_run, tmp_path, capsys):
    workdir, _, _ = tiny_run
    for extra, each in [([], 4 * (2048 + 1008)), ([f"--save_samples={tmp_path / 's.npz'}"],
                                                  4 * (2048 + 1008) + 16 * 16 * 4)]:
        with pytest.raises(absl_app.UsageError,
                           match=f"10,000,000,000 images need .* GiB to hold \\({each:,} "):
            run_cli([f"--workdir={workdir}", "--num_samples=10000000000",
                     f"--ref_stats={tmp_path / 'never.npz'}", *extra], capsys)
    assert not (tmp_path / "never.npz").exists()


def test_unusable_samples_are_refused_in_one_line(grey_reference, tmp_path, capsys):
    """Random bytes, a damaged archive and images with NaN pixels get no score."""
    junk, cut, nan = (str(tmp_path / name) for name in ("junk.npz", "cut.npz", "nan.npz"))
    with open(junk, "wb") as f:
        f.write(np.random.default_rng(0).bytes(5000))
    images = smooth_images(8, seed=1)[..., :1]
    np.savez(cut, samples=images)
    with open(cut, "r+b") as f:
        f.truncate(600)
    images[3, 2, 2, 0] = np.nan  # one broken pixel in one image
    np.savez(nan, samples=images)
    for path, message in [(junk, "is not an .npz file (it does not start as a zip archive)"),
                          (cut, "is a damaged .npz"),
                          (nan, "1 of 8 images hold NaN or infinite pixels")]:
        with pytest.raises(SystemExit) as error:
            run_cli([f"--samples={path}", f"--ref_stats={grey_reference}"], capsys)
        assert message in str(error.value) and "pickle" not in str(error.value)
        assert str(error.value).startswith("evaluate: ")


def test_data_init_starts_each_seed_from_its_held_out_image(tmp_path):
    """With data_init (honoured as by ncsn_tf.sample), seed s starts from held-out image s
    (mod the split's size) perturbed by σ1; without it from uniform noise."""
    from ncsn_tf import data
    config = presets.override(presets.get("digits"), ngf=4, num_scales=3, n_steps_each=1)
    keras.utils.set_random_seed(0)
    net = models.build(config)
    workdir = str(tmp_path / "run")
    checkpoints.save_converted(workdir, config, net, net, 1)
    held_out = np.concatenate(list(data.load(config, "test", training=False, batch_size=197)))
    starts = data.HeldOutImages(config)
    np.testing.assert_array_equal(starts([5, 197 + 3, 0]), held_out[[5, 3, 0]])

    seeds = np.array([0, 5, 200], np.int64)
    model = evaluation.load_checkpoint_model(workdir, {"data_init": True})
    assert model.sampler["data_init"] is True
    sampler = sampling.AnnealedLangevin.from_config(
        lambda x, labels: net(x, labels, training=False), net.sigmas, config)
    expected = image_io.to_uint8(sampler.sample(seeds, held_out[[0, 5, 3]])["samples"]).numpy()
    np.testing.assert_array_equal(model.sample_fn(seeds), expected)
    from_noise = evaluation.load_checkpoint_model(workdir).sample_fn(seeds)
    assert not np.array_equal(from_noise, expected)


def test_checkpoint_models_sample_with_the_chosen_sampler(tmp_path):
    """evaluate / the fast-FID sweep take the sampler from the config or its flags; the
    recorded settings say which and its NFE."""
    config = presets.override(presets.get("digits"), ngf=4, num_scales=3, n_steps_each=1)
    keras.utils.set_random_seed(0)
    net = models.build(config)
    workdir = str(tmp_path / "run")
    checkpoints.save_converted(workdir, config, net, net, 1)
    model = evaluation.load_checkpoint_model(workdir, {"sampler": "pc", "num_steps": 2})
    assert (model.sampler["sampler"], model.sampler["num_steps"], model.sampler["nfe"]) == (
        "pc", 2, 4)
    assert model.sampler["snr"] == config.sampling.snr and "step_lr" not in model.sampler
    pc = sampling.for_network(net, presets.override(config, sampler="pc", num_steps=2))
    seeds = np.array([4, 7], np.int64)
    np.testing.assert_array_equal(model.sample_fn(seeds),
                                  image_io.to_uint8(pc.sample(seeds)["samples"]).numpy())
    model = evaluation.load_checkpoint_model(workdir, {"sampler": "dpm", "num_steps": 3})
    assert (model.sampler["sampler"], model.sampler["nfe"]) == ("dpm", 3)
    dpm = sampling.for_network(net, presets.override(config, sampler="dpm", num_steps=3))
    np.testing.assert_array_equal(model.sample_fn(seeds),
                                  image_io.to_uint8(dpm.sample(seeds)["samples"]).numpy())
