"""ScoreModel: DSM training step, EMA, randomness and tf.distribute equivalence.

Most tests use a two-conv stand-in score network (same call signature and `sigmas` weight as
NCSNv2): tracing the real RefineNet graph costs tens of seconds per replica on 2 CPU cores, and
nothing here depends on the architecture. `test_real_network_trains` runs the real network once
(on one device; its two-replica equivalence holds too but costs a minute to trace).
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from ncsn_tf.training import optimizers, score_model
from ncsn_tf.config import presets
from ncsn_tf.training.score_model import ScoreModel, draw_perturbation

SIZE, CHANNELS, LEVELS = 8, 1, 10
SIGMAS = np.geomspace(5.0, 0.01, LEVELS).astype(np.float32)


class TinyScore(keras.Model):
    """Stand-in score network: two convolutions divided by σ (the paper's Technique 3)."""

    def __init__(self, sigmas=SIGMAS, dtype=None, **kwargs):
        super().__init__(**kwargs)  # the policy goes to the layers: inputs stay float32
        sigmas = np.asarray(sigmas, np.float32)
        self.sigmas = self.add_weight(
            name="sigmas", shape=sigmas.shape, dtype="float32", trainable=False,
            initializer=lambda shape, dtype=None: tf.constant(sigmas))
        self.hidden = keras.layers.Conv2D(8, 3, padding="same", activation="elu", dtype=dtype)
        self.out = keras.layers.Conv2D(CHANNELS, 3, padding="same", dtype=dtype)

    def call(self, x, labels, training=None):
        h = self.out(self.hidden(2.0 * x - 1.0))
        return tf.cast(h, tf.float32) / tf.gather(self.sigmas, labels)[:, None, None, None]


def tiny_config(**overrides):
    values = dict(image_size=SIZE, channels=CHANNELS, num_scales=LEVELS, sigma_begin=5.0,
                  sigma_end=0.01, ema_rate=0.9, lr=1e-3, seed=3)
    values.update(overrides)
    return presets.override(presets.get("digits"), **values)


def tiny_model(config, init_seed=0, dtype=None, **kwargs):
    """A compiled ScoreModel over two stand-in networks with reproducible initial weights."""
    keras.utils.set_random_seed(init_seed)
    nets = []
    for _ in range(2):
        net = TinyScore(dtype=dtype)
        net(tf.zeros([1, SIZE, SIZE, CHANNELS]), tf.zeros([1], tf.int32))
        nets.append(net)
    model = ScoreModel(config, *nets, **kwargs)
    model.compile()
    return model


def images(n, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, SIZE, SIZE, CHANNELS)).astype(np.float32)


def numpy_weights(layer):
    return [w.numpy() for w in layer.weights]


def assert_weights_close(actual, expected, rtol=0.0, atol=0.0):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def train(model, data, **kwargs):
    """`fit` without Keras' progress bar; returns the history dict."""
    return model.fit(data, verbose=0, shuffle=False, **kwargs).history


def numpy_dsm(net, x, labels, noise, anneal_power=2.0):
    """The annealed DSM loss per example, written out in NumPy around the network call."""
    sigma = SIGMAS[labels][:, None, None, None]
    perturbed = x + sigma * noise
    score = net(tf.constant(perturbed), tf.constant(labels)).numpy()
    per_example = 0.5 * ((score + noise / sigma) ** 2).sum(axis=(1, 2, 3))
    return per_example * SIGMAS[labels] ** anneal_power


def test_draws_are_independent_of_the_batch_split():
    seed = tf.constant([3, 7], tf.int64)
    labels, noise = draw_perturbation(seed, [8, SIZE, SIZE, CHANNELS], LEVELS)
    parts = [draw_perturbation(seed, [n, SIZE, SIZE, CHANNELS], LEVELS, global_batch=8,
                               start=start) for start, n in ((0, 3), (3, 5))]
    np.testing.assert_array_equal(labels, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(noise, np.concatenate([p[1] for p in parts]))
    assert labels.dtype == tf.int32 and noise.shape == (8, SIZE, SIZE, CHANNELS)
    _, other_noise = draw_perturbation(tf.constant([3, 8], tf.int64), [8, SIZE, SIZE, CHANNELS],
                                       LEVELS)
    assert not np.allclose(noise, other_noise)
    # Many draws: labels cover all levels uniformly; noise is standard normal.
    labels, noise = draw_perturbation(seed, [20000, 2, 2, 1], LEVELS)
    assert np.abs(np.bincount(labels.numpy(), minlength=LEVELS) / 20000 - 0.1).max() < 0.02
    assert labels.numpy().max() < LEVELS
    assert abs(noise.numpy().mean()) < 0.02 and abs(noise.numpy().std() - 1.0) < 0.02


def test_train_step_reports_the_dsm_loss_and_gradient_norm(monkeypatch):
    """With the draws fixed, fit's metrics equal the NumPy DSM loss of the pre-step network,
    its per-bucket means, and the norm of the gradient of the batch-mean loss."""
    x = images(8)
    labels = np.array([0, 1, 2, 2, 5, 7, 9, 9], np.int32)  # buckets 0,0,0,0,2,2,3,3; 1 empty
    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    monkeypatch.setattr(score_model, "draw_perturbation",
                        lambda *args: (tf.constant(labels), tf.constant(noise)))
    model = tiny_model(tiny_config())
    per_example = numpy_dsm(model.net, x, labels, noise)
    with tf.GradientTape() as tape:
        sigma = tf.constant(SIGMAS[labels])[:, None, None, None]
        score = model.net(x + sigma * noise, labels, training=True)
        loss = tf.reduce_mean(0.5 * tf.reduce_sum((score + noise / sigma) ** 2, [1, 2, 3])
                              * sigma[:, 0, 0, 0] ** 2)
    grad_norm = np.sqrt(sum((g.numpy().astype(np.float64) ** 2).sum()
                            for g in tape.gradient(loss, model.net.trainable_variables)))

    logs = train(model, tf.data.Dataset.from_tensors(x))
    np.testing.assert_allclose(logs["loss"][0], per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(logs["grad_norm"][0], grad_norm, rtol=1e-4)
    buckets = labels * 4 // LEVELS
    for k in (0, 2, 3):
        np.testing.assert_allclose(logs[f"loss_bucket_{k}"][0], per_example[buckets == k].mean(),
                                   rtol=1e-5)
    assert logs["loss_bucket_1"][0] == 0.0  # no example in this bucket: weight 0, not NaN


def test_test_step_scores_with_the_ema_network(monkeypatch):
    x = images(8)
    labels = np.arange(8, dtype=np.int32)
    noise = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    model = tiny_model(tiny_config())
    train(model, tf.data.Dataset.from_tensors(images(8, seed=5)).repeat(3))
    monkeypatch.setattr(score_model, "draw_perturbation",
                        lambda *args: (tf.constant(labels), tf.constant(noise)))
    ema_loss = numpy_dsm(model.ema_net, x, labels, noise).mean()
    live_loss = numpy_dsm(model.net, x, labels, noise).mean()
    assert abs(ema_loss - live_loss) > 1e-3 * ema_loss  # the check below can tell them apart
    result = model.evaluate(tf.data.Dataset.from_tensors(x), verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], ema_loss, rtol=1e-5)
    assert "grad_norm" not in result


def test_ema_follows_the_recursion_and_never_feeds_back():
    """ema_k = rate·ema_(k−1) + (1 − rate)·w_k with ema_0 = w_0; the live weights do not depend
    on the EMA rate."""
    batches = [images(8, seed=s) for s in range(3)]
    model = tiny_model(tiny_config(ema_rate=0.9))
    other = tiny_model(tiny_config(ema_rate=0.5))
    trainable = [w.trainable for w in model.net.weights]
    expected = numpy_weights(model.net)
    assert_weights_close(numpy_weights(model.ema_net), expected)
    for x in batches:
        for m in (model, other):
            train(m, tf.data.Dataset.from_tensors(x))
        live = numpy_weights(model.net)
        expected = [0.9 * e + 0.1 * w if t else w for e, w, t in zip(expected, live, trainable)]
        assert_weights_close(live, numpy_weights(other.net))
    assert_weights_close(numpy_weights(model.ema_net), expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(numpy_weights(model.ema_net)[1], live[1])


def test_fit_twice_continues_from_the_live_weights():
    """Two fits of 2 steps equal one fit of 4: live weights are never replaced by the EMA and
    the draws continue from the optimizer step."""
    data = tf.data.Dataset.from_tensor_slices(images(32)).batch(8)
    once = tiny_model(tiny_config())
    train(once, data)
    twice = tiny_model(tiny_config())
    train(twice, data.take(2))
    train(twice, data.skip(2))
    assert int(twice.optimizer.iterations.numpy()) == 4
    assert_weights_close(numpy_weights(twice.net) + numpy_weights(twice.ema_net),
                         numpy_weights(once.net) + numpy_weights(once.ema_net),
                         rtol=1e-6, atol=1e-8)
    assert not np.allclose(numpy_weights(twice.net)[1], numpy_weights(twice.ema_net)[1])


def test_mirrored_strategy_matches_a_single_device():
    """Two replicas on the conftest's logical CPUs give the single-device losses (training and
    held-out, i.e. train_step and test_step), weights, EMA and Adam state, with an uneven last
    batch (7 = 4 + 3) and global-norm clipping active.

    Tolerance: the replicas sum their halves of the batch separately before the all-reduce, so
    gradients differ from the single-device ones by float32 summation order (~1e-7 relative);
    Adam normalises them, so weights differ by at most lr·1e-6-ish. rtol 1e-5 / atol 1e-7 covers
    this and is far below the effect of any real mismatch (a different draw or gradient moves
    weights by ~lr = 1e-3).
    """
    config = tiny_config(grad_clip=1.0)  # the gradient norm is ~10²: clipping is active
    data = tf.data.Dataset.from_tensor_slices(images(15)).batch(8)  # batches of 8 and 7
    single = tiny_model(config)
    single_logs = train(single, data, epochs=2, validation_data=data)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = tiny_model(config)
    mirrored_logs = train(mirrored, data, epochs=2, validation_data=data)

    assert single_logs["grad_norm"][0] > 10 * config.optim.grad_clip
    assert set(mirrored_logs) == set(single_logs) and "val_loss" in single_logs
    for key, values in single_logs.items():
        np.testing.assert_allclose(mirrored_logs[key], values, rtol=1e-5, err_msg=key)
    for a, b in zip(single.net.weights + single.ema_net.weights + single.optimizer.variables,
                    mirrored.net.weights + mirrored.ema_net.weights
                    + mirrored.optimizer.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)
    assert int(mirrored.optimizer.iterations.numpy()) == 4


def test_bf16_trains_with_float32_weights_and_loss():
    x = tf.data.Dataset.from_tensors(images(8))
    reference = train(tiny_model(tiny_config()), x)
    model = tiny_model(tiny_config(precision="bf16"), dtype="mixed_bfloat16")
    logs = train(model, x)
    assert all(w.dtype == "float32" for w in model.net.weights + model.ema_net.weights)
    np.testing.assert_allclose(logs["loss"][0], reference["loss"][0], rtol=0.05)
    np.testing.assert_allclose(logs["grad_norm"][0], reference["grad_norm"][0], rtol=0.05)


def test_fp16_uses_loss_scaling_and_reports_the_unscaled_gradient_norm():
    x = tf.data.Dataset.from_tensors(images(8))
    reference = train(tiny_model(tiny_config()), x)
    config = tiny_config(precision="fp16")
    # The default initial loss scale (2^15) overflows float16 on the first step: the step is
    # skipped, the scale halves, and grad_norm leaves the step out instead of reading inf.
    model = tiny_model(config, dtype="mixed_float16")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    before = numpy_weights(model.net)
    logs = train(model, x)
    assert logs["grad_norm"][0] == 0.0 and np.isfinite(logs["loss"][0])
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0 ** 14
    assert_weights_close(numpy_weights(model.net), before)
    # With a scale that fits, the step is taken and the norm is unscaled.
    model = tiny_model(config, dtype="mixed_float16")
    model.compile(keras.optimizers.LossScaleOptimizer(optimizers.build_optimizer(config).
                                                      inner_optimizer, initial_scale=8.0))
    logs = train(model, x)
    np.testing.assert_allclose(logs["loss"][0], reference["loss"][0], rtol=0.05)
    np.testing.assert_allclose(logs["grad_norm"][0], reference["grad_norm"][0], rtol=0.05)
    assert not np.allclose(numpy_weights(model.net)[1], before[1])
    # A skipped step leaves the EMA alone too (it now differs from the live weights, so an
    # EMA update would move it).
    live, ema = numpy_weights(model.net), numpy_weights(model.ema_net)
    assert not np.allclose(live[1], ema[1])
    model.optimizer.dynamic_scale.assign(2.0 ** 15)
    logs = train(model, x)
    assert logs["grad_norm"][0] == 0.0  # skipped
    assert_weights_close(numpy_weights(model.net), live)
    assert_weights_close(numpy_weights(model.ema_net), ema)
    assert int(model.step.numpy()) == 2


def test_held_out_loss_is_exact_and_the_same_for_every_checkpoint():
    """`evaluate` over batches of 8, 8 and 3 gives the exact mean of the NumPy DSM loss over
    all 19 examples, under draws keyed by the batch alone: evaluating weights in any order, or
    twice, gives the same numbers (the training step does not enter)."""
    x = images(19, seed=4)
    data = tf.data.Dataset.from_tensor_slices(x).batch(8)
    model = tiny_model(tiny_config())
    expected = []
    for k, start in enumerate((0, 8, 16)):
        batch = x[start:start + 8]
        labels, noise = draw_perturbation(model._seed(score_model._TEST_STREAM, k), batch.shape,
                                          LEVELS)
        expected.append(numpy_dsm(model.ema_net, batch, labels.numpy(), noise.numpy()))
    exact = np.concatenate(expected).mean()
    first = model.evaluate(data, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(first, exact, rtol=1e-5)
    assert abs(first - np.mean([e.mean() for e in expected])) > 1e-4 * exact  # tells them apart
    initial = numpy_weights(model.ema_net)
    train(model, tf.data.Dataset.from_tensors(images(8, seed=9)).repeat(3))
    trained = model.evaluate(data, verbose=0, return_dict=True)["loss"]
    for w, value in zip(model.ema_net.weights, initial):
        w.assign(value)
    assert model.evaluate(data, verbose=0, return_dict=True)["loss"] == first
    assert trained != first


def test_real_network_trains():
    """The NCSNv2 network from `models.build`: one step changes it, the EMA trails it, and the
    metrics are finite."""
    config = presets.override(presets.get("cifar10"), ngf=4, num_scales=LEVELS, image_size=8,
                              channels=CHANNELS, ema_rate=0.9)
    keras.utils.set_random_seed(0)
    model = ScoreModel(config)
    model.compile()
    before = numpy_weights(model.net)
    data = tf.data.Dataset.from_tensors(images(4))
    logs = train(model, data)
    assert all(np.isfinite(v[0]) for v in logs.values())
    after, ema = numpy_weights(model.net), numpy_weights(model.ema_net)
    moved = [i for i, w in enumerate(model.net.weights) if w.trainable]
    for i in moved:
        np.testing.assert_allclose(ema[i], 0.9 * before[i] + 0.1 * after[i], rtol=1e-5, atol=1e-7)
    assert max(np.abs(after[i] - before[i]).max() for i in moved) > 1e-5


def test_rejects_mismatched_networks_and_bad_ema_rate():
    config = tiny_config()
    net = TinyScore()
    net(tf.zeros([1, SIZE, SIZE, CHANNELS]), tf.zeros([1], tf.int32))
    other = TinyScore(sigmas=SIGMAS[:5])
    other(tf.zeros([1, SIZE, SIZE, CHANNELS]), tf.zeros([1], tf.int32))
    with pytest.raises(ValueError, match="same architecture"):
        ScoreModel(config, net, other)
    with pytest.raises(ValueError, match="ema_rate"):
        ScoreModel(tiny_config(ema_rate=1.5), net, net)
