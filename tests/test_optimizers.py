"""Adam with PyTorch semantics, against the update rule written out in NumPy and torch.optim."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from ncsn_tf.training import optimizers
from ncsn_tf.config import presets

SHAPES = [(3, 4), (5,), (2, 3, 3, 2)]
STEPS = 6


def gradient_sequence(seed=0):
    """Gradients spanning 1e-5 … 10 in magnitude, so both √v̂ ≪ ε and √v̂ ≫ ε occur."""
    rng = np.random.default_rng(seed)
    return [[(rng.normal(size=s) * 10.0 ** rng.uniform(-5, 1, size=s)).astype(np.float32)
             for s in SHAPES] for _ in range(STEPS)]


def initial_params(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def pytorch_adam_numpy(params, grads, lr, beta1, beta2, eps, weight_decay=0.0, clip=None):
    """torch.optim.Adam (+ torch.nn.utils.clip_grad_norm_) written out in float64."""
    params = [p.astype(np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        g = [x.astype(np.float64) for x in step_grads]
        if clip:
            total = np.sqrt(sum((x ** 2).sum() for x in g))
            g = [x * min(1.0, clip / total) for x in g]
        for i, p in enumerate(params):
            gi = g[i] + weight_decay * p
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            v[i] = beta2 * v[i] + (1 - beta2) * gi ** 2
            m_hat = m[i] / (1 - beta1 ** t)
            v_hat = v[i] / (1 - beta2 ** t)
            params[i] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


def run_tf(optimizer, params, grads):
    variables = [keras.Variable(p) for p in params]
    for step_grads in grads:
        optimizer.apply([tf.constant(g) for g in step_grads], variables)
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("eps", [1e-3, 1e-8])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_matches_the_pytorch_update_rule(eps, weight_decay):
    params, grads = initial_params(), gradient_sequence()
    ours = run_tf(optimizers.Adam(learning_rate=1e-2, epsilon=eps, weight_decay=weight_decay),
                  params, grads)
    expected = pytorch_adam_numpy(params, grads, 1e-2, 0.9, 0.999, eps, weight_decay)
    for a, b in zip(ours, expected):
        # float32 arithmetic over 6 steps of size ≤ lr: errors ~1e-7 of the parameter.
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_global_norm_clipping_matches_pytorch():
    params, grads = initial_params(), gradient_sequence()
    ours = run_tf(optimizers.Adam(learning_rate=1e-2, epsilon=1e-3, global_clipnorm=0.5),
                  params, grads)
    expected = pytorch_adam_numpy(params, grads, 1e-2, 0.9, 0.999, 1e-3, clip=0.5)
    unclipped = pytorch_adam_numpy(params, grads, 1e-2, 0.9, 0.999, 1e-3)
    assert max(np.abs(a - b).max() for a, b in zip(expected, unclipped)) > 1e-3
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_differs_from_keras_adam_where_epsilon_matters():
    """At FFHQ's ε = 1e-3 Keras' ε-hat placement gives a visibly different trajectory."""
    params, grads = initial_params(), gradient_sequence()
    ours = run_tf(optimizers.Adam(learning_rate=1e-2, epsilon=1e-3), params, grads)
    theirs = run_tf(keras.optimizers.Adam(learning_rate=1e-2, epsilon=1e-3), params, grads)
    assert max(np.abs(a - b).max() for a, b in zip(ours, theirs)) > 1e-4


def test_matches_torch_optim_adam():
    torch = pytest.importorskip("torch", reason="torch is optional (extra `torch`)")
    params, grads = initial_params(), gradient_sequence()
    for eps, weight_decay, clip in ((1e-3, 0.0, None), (1e-8, 0.05, 0.5)):
        ours = run_tf(optimizers.Adam(learning_rate=1e-2, epsilon=eps,
                                      weight_decay=weight_decay, global_clipnorm=clip),
                      params, grads)
        tensors = [torch.nn.Parameter(torch.tensor(p)) for p in params]
        adam = torch.optim.Adam(tensors, lr=1e-2, betas=(0.9, 0.999), eps=eps,
                                weight_decay=weight_decay)
        for step_grads in grads:
            for t, g in zip(tensors, step_grads):
                t.grad = torch.tensor(g)
            if clip:
                torch.nn.utils.clip_grad_norm_(tensors, clip)
            adam.step()
        for a, t in zip(ours, tensors):
            np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_replicas_apply_presummed_gradients_once():
    """Under MirroredStrategy the optimizer takes gradients already summed over replicas (as
    ScoreModel.train_step passes them): it must not sum them again."""
    params, grads = initial_params(), gradient_sequence()[:2]
    single = optimizers.Adam(learning_rate=1e-2, epsilon=1e-3)
    single_vars = [keras.Variable(p) for p in params]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = optimizers.Adam(learning_rate=1e-2, epsilon=1e-3)
        mirrored_vars = [keras.Variable(p) for p in params]

    @tf.function
    def step(step_grads):
        strategy.run(lambda: mirrored.apply(list(step_grads), mirrored_vars))

    for step_grads in grads:
        single.apply([tf.constant(g) for g in step_grads], single_vars)
        step([tf.constant(g) for g in step_grads])
    for a, b in zip(single.variables + single_vars, mirrored.variables + mirrored_vars):
        for replica_value in strategy.experimental_local_results(b.value):
            np.testing.assert_allclose(replica_value.numpy(), a.numpy(), rtol=1e-6)


def test_build_optimizer_reads_the_config():
    config = presets.override(presets.get("ffhq"), lr=2e-4, beta1=0.5, weight_decay=0.01,
                              grad_clip=1.0)
    optimizer = optimizers.build_optimizer(config)
    assert isinstance(optimizer, optimizers.Adam)
    assert (float(optimizer.learning_rate.numpy()), optimizer.beta_1, optimizer.beta_2,
            optimizer.epsilon, optimizer.l2_weight_decay, optimizer.global_clipnorm) == \
        (pytest.approx(2e-4), 0.5, 0.999, 1e-3, 0.01, 1.0)
    restored = optimizers.Adam.from_config(optimizer.get_config())
    assert (restored.epsilon, restored.l2_weight_decay, restored.global_clipnorm) == \
        (1e-3, 0.01, 1.0)
    assert optimizers.build_optimizer(presets.get("cifar10")).global_clipnorm is None

    fp16 = optimizers.build_optimizer(presets.override(config, precision="fp16"))
    assert isinstance(fp16, keras.optimizers.LossScaleOptimizer)
    assert isinstance(fp16.inner_optimizer, optimizers.Adam)


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("beta2", 1.0), ("adam_eps", -1.0),
                                          ("grad_clip", -1.0), ("weight_decay", -0.1)])
def test_build_optimizer_rejects_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        optimizers.build_optimizer(presets.override(presets.get("cifar10"), **{field: value}))
