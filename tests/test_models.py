"""NCSNv2 networks and blocks against written-out NumPy formulas and the paper's sizes.

Parity with the official PyTorch outputs is in test_convert.py (it needs the official weights).
"""
import keras
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from ncsn_tf import models
from ncsn_tf.config import presets
from ncsn_tf.models import layers


def _rng(seed=0):
    return np.random.default_rng(seed)


def _tiny_config(**fields):
    base = dict(arch="auto", ngf=8, num_scales=6, sigma_begin=3.0, sigma_end=0.05,
                image_size=16, channels=3)
    base.update(fields)
    return presets.override(presets.get("cifar10"), **base)


def _identity_kernels(layer):
    """Sets every 3x3 conv kernel inside `layer` to the identity (centre tap 1, no mixing)."""
    for conv in layer.convs:
        kernel = np.zeros(conv.kernel.shape, np.float32)
        kernel[1, 1] = np.eye(kernel.shape[2], kernel.shape[3])
        conv.kernel.assign(kernel)


def _elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _instance_norm_plus_np(x, alpha, gamma, beta, eps=1e-5):
    mu = x.mean(axis=(1, 2))
    var = x.var(axis=(1, 2))
    mu_hat = (mu - mu.mean(-1, keepdims=True)) / np.sqrt(mu.var(-1, ddof=1, keepdims=True) + eps)
    h = (x - mu[:, None, None]) / np.sqrt(var[:, None, None] + eps)
    return gamma * (h + (alpha * mu_hat)[:, None, None]) + beta


def _norm_with_random_affine(policy, channels, rng):
    norm = layers.InstanceNormPlus(channels, dtype=policy)
    weights = [rng.normal(1.0, 0.3, channels).astype(np.float32) for _ in range(2)]
    weights.append(rng.normal(0.0, 0.3, channels).astype(np.float32))
    for var, value in zip((norm.alpha, norm.gamma, norm.beta), weights):
        var.assign(value)
    return norm, weights


def test_instance_norm_plus_matches_numpy():
    rng = _rng()
    x = (rng.normal(size=(3, 7, 5, 6)) * rng.uniform(0.5, 3, 6) + rng.normal(size=6) * 2)
    x = x.astype(np.float32)
    norm, (alpha, gamma, beta) = _norm_with_random_affine("float32", 6, rng)
    out = norm(x).numpy()
    np.testing.assert_allclose(out, _instance_norm_plus_np(x.astype(np.float64), alpha, gamma,
                                                           beta), atol=2e-5)


def test_instance_norm_plus_bf16_keeps_float32_statistics():
    rng = _rng(1)
    x = (rng.normal(size=(2, 8, 8, 4)) * 2 + 5).astype(np.float32)
    norm, (alpha, gamma, beta) = _norm_with_random_affine("mixed_bfloat16", 4, rng)
    out = norm(tf.cast(x, tf.bfloat16))
    assert out.dtype == tf.bfloat16
    assert norm.alpha.dtype == "float32"
    x_bf16 = tf.cast(tf.cast(x, tf.bfloat16), tf.float64).numpy()  # what the layer was given
    expected = _instance_norm_plus_np(x_bf16, alpha, gamma, beta)
    # Only the final rounding to bfloat16 (8 significant bits) separates the two.
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected,
                               atol=2 ** -8 * np.abs(expected).max())


def test_instance_norm_plus_with_elu_rounds_once_after_the_activation():
    """`elu=True` is ELU(InstanceNorm++(x)) computed in float32 and rounded to the compute
    dtype once; `layers.elu` matches ELU within one bfloat16 rounding."""
    rng = _rng(4)
    x = (rng.normal(size=(2, 8, 8, 5)) * 3 - 1).astype(np.float32)
    for policy, tolerance in (("float32", 2e-5), ("mixed_bfloat16", 2 ** -8)):
        norm, (alpha, gamma, beta) = _norm_with_random_affine(policy, 5, rng)
        norm.elu = True
        given = tf.cast(x, norm.compute_dtype)
        out = tf.cast(norm(given), tf.float32).numpy()
        expected = _elu(_instance_norm_plus_np(tf.cast(given, tf.float64).numpy(), alpha,
                                               gamma, beta))
        np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)
    y = tf.cast(x, tf.bfloat16)
    assert layers.elu(y).dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(layers.elu(y), tf.float32).numpy(),
                               _elu(tf.cast(y, tf.float64).numpy()), rtol=2 ** -8, atol=2 ** -8)


def test_conv_mean_pool_is_conv_then_2x2_mean():
    rng = _rng(2)
    x = rng.normal(size=(2, 6, 4, 3)).astype(np.float32)
    layer = layers.ConvMeanPool(3, 5, kernel_size=1)
    out = layer(x).numpy()
    w = layer.conv.kernel.numpy()[0, 0]
    b = layer.conv.bias.numpy()
    conv = x @ w + b
    expected = conv.reshape(2, 3, 2, 2, 2, 5).mean(axis=(2, 4))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_rcu_with_identity_kernels():
    x = _rng(3).normal(size=(2, 5, 5, 4)).astype(np.float32)
    rcu = layers.RCUBlock(4, n_blocks=2, n_stages=2)
    _identity_kernels(rcu)
    expected = x
    for _ in range(2):
        expected = expected + _elu(_elu(expected))
    np.testing.assert_allclose(rcu(x).numpy(), expected, atol=1e-5)


def test_crp_pools_5x5_like_torch_padding():
    x = _rng(4).normal(size=(2, 7, 6, 3)).astype(np.float32)
    crp = layers.CRPBlock(3, n_stages=2)
    _identity_kernels(crp)

    def maxpool(a):  # torch MaxPool2d(5, stride 1, padding 2) pads with -inf
        return scipy.ndimage.maximum_filter(a, size=(1, 5, 5, 1), mode="constant",
                                            cval=-np.inf)

    x0 = _elu(x)
    p1 = maxpool(x0)
    np.testing.assert_allclose(crp(x).numpy(), x0 + p1 + maxpool(p1), atol=1e-5)


def _upsample_align_corners_np(x, out_h, out_w):
    def matrix(n_in, n_out):
        src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        m = np.zeros((n_out, n_in))
        np.add.at(m, (np.arange(n_out), lo), 1 - (src - lo))
        np.add.at(m, (np.arange(n_out), hi), src - lo)
        return m

    return np.einsum("ih,bhwc,jw->bijc", matrix(x.shape[1], out_h), x, matrix(x.shape[2], out_w))


def test_msf_upsamples_bilinear_with_align_corners():
    rng = _rng(5)
    fine = rng.normal(size=(2, 8, 6, 3)).astype(np.float32)
    coarse = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
    msf = layers.MSFBlock([3, 3], 3)
    _identity_kernels(msf)
    for conv in msf.convs:
        conv.bias.assign(np.zeros(3, np.float32))
    expected = fine + _upsample_align_corners_np(coarse, 8, 6)
    np.testing.assert_allclose(msf([fine, coarse]).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("resample, dilation, out_size, shortcut_kernel", [
    (None, None, 8, (1, 1, 4, 6)),       # channel change: 1x1 shortcut
    ("down", None, 4, (1, 1, 4, 6)),     # mean-pooled 1x1 shortcut
    ("down", 2, 8, (3, 3, 4, 6)),        # official: dilated "down" block does not pool
    (None, 4, 8, (3, 3, 4, 6)),
])
def test_residual_block_resampling(resample, dilation, out_size, shortcut_kernel):
    block = layers.ResidualBlock(4, 6, resample=resample, dilation=dilation)
    out = block(np.ones((1, 8, 8, 4), np.float32) * np.arange(4, dtype=np.float32))
    assert out.shape == (1, out_size, out_size, 6)
    shortcut = block.shortcut.conv if resample == "down" and dilation is None else block.shortcut
    assert tuple(shortcut.kernel.shape) == shortcut_kernel
    assert shortcut.dilation_rate == (dilation or 1,) * 2


def test_residual_block_identity_shortcut():
    block = layers.ResidualBlock(4, 4)
    x = _rng(6).normal(size=(1, 6, 6, 4)).astype(np.float32)
    assert block.shortcut is None
    block.conv2.kernel.assign(np.zeros(block.conv2.kernel.shape, np.float32))
    block.conv2.bias.assign(np.zeros(block.conv2.bias.shape, np.float32))
    np.testing.assert_allclose(block(x).numpy(), x, atol=1e-6)


def test_full_width_parameter_counts():
    """The paper's sizes at ngf=128, 3 channels (the weights exist once constructed)."""
    expected = {models.NCSNv2: 29_694_083, models.NCSNv2Deeper: 83_445_379,
                models.NCSNv2Deepest: 94_132_611}
    for cls, count in expected.items():
        net = cls(3, 128, [1.0])
        assert sum(int(np.prod(w.shape)) for w in net.trainable_weights) == count, cls.__name__
        del net


@pytest.mark.parametrize("arch, size, expected", [
    ("auto", 28, "ncsnv2"), ("auto", 64, "ncsnv2"), ("auto", 96, "ncsnv2_deeper"),
    ("auto", 128, "ncsnv2_deeper"), ("auto", 256, "ncsnv2_deepest"),
    ("ncsnv2_deepest", 32, "ncsnv2_deepest"),
])
def test_arch_name(arch, size, expected):
    assert models.arch_name(_tiny_config(arch=arch, image_size=size)) == expected


def test_build_rejects_bad_settings():
    with pytest.raises(ValueError, match="Unknown arch"):
        models.build(_tiny_config(arch="resnet"))
    with pytest.raises(ValueError, match="multiples of 4"):
        models.build(_tiny_config(arch="ncsnv2_deeper", image_size=30))
    with pytest.raises(ValueError, match="multiples of 2"):
        models.build(_tiny_config(image_size=15))
    with pytest.raises(ValueError, match="Unknown precision"):
        models.build(_tiny_config(precision="fp8"))
    with pytest.raises(ValueError, match="sigma_dist"):
        models.build(_tiny_config(sigma_dist="cosine"))


@pytest.mark.parametrize("arch, size, channels", [
    ("ncsnv2", 28, 1), ("ncsnv2_deeper", 16, 3), ("ncsnv2_deepest", 16, 2)])
def test_build_shapes_and_sigmas(arch, size, channels):
    config = _tiny_config(arch=arch, image_size=size, channels=channels, ngf=4)
    net = models.build(config)
    assert type(net) is models.ARCHITECTURES[arch]
    assert net.built and net.trainable_weights  # weights exist before any user call
    np.testing.assert_allclose(net.sigmas.numpy(), np.geomspace(3.0, 0.05, 6), rtol=1e-6)
    assert not net.sigmas.trainable
    assert all(w is not net.sigmas for w in net.trainable_weights)
    x = _rng(7).uniform(size=(2, size, size, channels)).astype(np.float32)
    out = net(x, np.array([0, 5]))
    assert out.shape == x.shape and out.dtype == tf.float32


def test_uniform_sigmas():
    net = models.build(_tiny_config(sigma_dist="uniform", ngf=4))
    np.testing.assert_allclose(net.sigmas.numpy(), np.linspace(3.0, 0.05, 6), rtol=1e-6)


def test_score_is_one_network_divided_by_sigma():
    """Technique 3: s(x, σ_i)·σ_i does not depend on i."""
    net = models.build(_tiny_config())
    x = np.repeat(_rng(8).uniform(size=(1, 16, 16, 3)).astype(np.float32), 6, axis=0)
    labels = np.arange(6)
    scaled = net(x, labels).numpy() * net.sigmas.numpy()[labels, None, None, None]
    np.testing.assert_allclose(scaled, np.repeat(scaled[:1], 6, axis=0), rtol=1e-5, atol=1e-6)


def test_every_weight_gets_a_gradient_in_a_clean_graph(capfd):
    net = models.build(_tiny_config(arch="ncsnv2_deepest", ngf=4))
    x = _rng(9).uniform(size=(2, 16, 16, 3)).astype(np.float32)

    @tf.function
    def gradients(x, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(net(x, labels) ** 2)
        return tape.gradient(loss, net.trainable_weights)

    grads = gradients(x, np.array([1, 2]))
    missing = [w.path for w, g in zip(net.trainable_weights, grads)
               if g is None or not np.any(g.numpy())]
    assert not missing
    # TF's graph optimizer must not give up on the network's graph (see RefineNetScore.call).
    assert "remapper failed" not in capfd.readouterr().err


def test_bf16_policy_computes_in_bf16_and_returns_float32():
    config = _tiny_config(image_size=32)
    net32 = models.build(config)
    net16 = models.build(presets.override(config, precision="bf16"))
    assert keras.config.dtype_policy().name == "float32"  # no global policy was set
    for target, source in zip(net16.weights, net32.weights):
        target.assign(source)
    conv = net16.begin_conv
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    x = _rng(10).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    labels = np.array([0, 5])
    ref, out = net32(x, labels).numpy(), net16(x, labels)
    assert out.dtype == tf.float32
    assert np.abs(out.numpy() - ref).max() <= 0.1 * np.abs(ref).max()


def test_call_inside_tf_function_28x28():
    net = models.build(_tiny_config(image_size=28, channels=1, ngf=4))
    x = _rng(11).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    labels = np.array([0, 1, 2])
    eager = net(x, labels).numpy()
    graph = tf.function(lambda a, b: net(a, b))(x, labels).numpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-5)


def test_tf_train_checkpoint_saves_every_weight(tmp_path):
    """Training and conversion write tf.train.Checkpoint(net=...); all weights must be in it."""
    config = _tiny_config(arch="ncsnv2_deepest", ngf=4)
    net, fresh = models.build(config), models.build(config)
    path = tf.train.Checkpoint(net=net).save(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(path) if name.startswith("net/")]
    assert len(saved) == len(net.weights)
    tf.train.Checkpoint(net=fresh).restore(path).assert_consumed()
    for a, b in zip(net.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_initial_weights_follow_pytorch_defaults_with_independent_draws():
    """Initial weights as the official code's PyTorch modules draw them: each conv's kernel and
    bias independently from U(±1/√fan_in) (what torch.nn.Conv2d does, checked against torch
    itself), InstanceNorm++'s α and γ independently from N(1, 0.02), β = 0."""
    torch = pytest.importorskip("torch")
    from scipy import stats
    keras.utils.set_random_seed(0)
    net = models.build(presets.get("digits"))
    convs = [layer for layer in net._flatten_layers() if isinstance(layer, keras.layers.Conv2D)]
    norms = [layer for layer in net._flatten_layers()
             if isinstance(layer, layers.InstanceNormPlus)]
    assert len(convs) > 40 and len(norms) > 15
    ours, theirs = [], []
    torch.manual_seed(0)
    for conv in convs:
        kh, kw, c_in, c_out = conv.kernel.shape
        bound = 1.0 / np.sqrt(c_in * kh * kw)
        reference = torch.nn.Conv2d(c_in, c_out, (kh, kw))
        assert np.abs(reference.weight.detach().numpy()).max() <= bound  # same bound as torch
        kernel = conv.kernel.numpy()
        ours.append(kernel.ravel() / bound)
        theirs.append(reference.weight.detach().numpy().ravel() / bound)
        if conv.use_bias:  # the official code's biasless convs (RefineNet blocks) have none
            bias = conv.bias.numpy()
            assert not np.allclose(bias, kernel[0, 0, 0]), "bias drawn from the kernel's seed"
            ours.append(bias / bound)
            theirs.append(reference.bias.detach().numpy() / bound)
        assert np.abs(ours[-1]).max() <= 1 and np.abs(ours[-2]).max() <= 1
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    # Same distribution as torch's (both U(-1, 1) after scaling) by a two-sample KS test.
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    assert stats.kstest(ours, stats.uniform(-1, 2).cdf).pvalue > 1e-3
    alpha = np.concatenate([n.alpha.numpy() for n in norms])
    gamma = np.concatenate([n.gamma.numpy() for n in norms])
    assert not np.allclose(alpha, gamma), "alpha and gamma drawn from one seed"
    for values in (alpha, gamma):
        assert stats.kstest(values, stats.norm(1.0, 0.02).cdf).pvalue > 1e-3
    assert abs(np.corrcoef(alpha, gamma)[0, 1]) < 0.2
    assert all(np.all(n.beta.numpy() == 0) for n in norms)


@pytest.mark.parametrize("arch, size", [("ncsnv2", 16), ("ncsnv2_deeper", 16),
                                        ("ncsnv2_deepest", 16)])
def test_score_at_continuous_sigma_equals_the_labelled_call(arch, size):
    """`net.score(x, σ)` at the table's σ values is the labelled call; in between it is the same
    unconditional output divided by σ (Technique 3), for every architecture."""
    keras.utils.set_random_seed(1)
    net = models.build(_tiny_config(arch=arch, image_size=size))
    x = _rng(3).uniform(size=(4, size, size, 3)).astype(np.float32)
    labels = np.array([0, 2, 5, 3], np.int32)
    table = net.sigmas.numpy()
    np.testing.assert_allclose(net.score(x, table[labels]).numpy(),
                               net(x, labels, training=False).numpy(), rtol=1e-6, atol=1e-6)
    between = np.sqrt(table[labels] * table[labels + (labels < 5)])  # geometric midpoints
    unconditional = net(x, labels, training=False).numpy() * table[labels][:, None, None, None]
    np.testing.assert_allclose(net.score(x, between).numpy(),
                               unconditional / between[:, None, None, None], rtol=1e-5,
                               atol=1e-6)
