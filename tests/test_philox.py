"""The batched per-seed generator against Random123's known answers and TensorFlow's own ops."""
import numpy as np
import pytest
import tensorflow as tf

from ncsn_tf.sampling import philox

SEEDS = np.array([0, 1, 7, 2**40 + 3, -5, 123456789], np.int64)


def _ints(*values):
    return [tf.constant(v, tf.int64) for v in values]


@pytest.mark.parametrize("key, counter, expected", [
    # Philox-4x32-10 known-answer vectors of Random123 (kat_vectors).
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(key, counter, expected):
    out = philox._philox(_ints(*counter), _ints(*key))
    assert [int(v) for v in out] == list(expected)


@pytest.mark.parametrize("shape", [(16, 16, 1), (3, 5, 1), (2,), (7, 9, 3)])
@pytest.mark.parametrize("counter", [0, 2, 737, 2**33 + 1])
def test_draws_equal_tensorflows_stateless_ops(shape, counter):
    """Row n is TF's stateless draw for seed (SEEDS[n], counter): uniforms bit for bit, normals
    to the last bit of glibc's logf/sinf/cosf, which TF ops cannot call."""
    uniform = philox.uniform(tf.constant(SEEDS), counter, shape).numpy()
    normal = philox.normal(tf.constant(SEEDS), counter, shape).numpy()
    assert uniform.shape == normal.shape == (len(SEEDS), *shape)
    for n, seed in enumerate(SEEDS):
        expected = tf.random.stateless_uniform(shape, [seed, counter], alg="philox").numpy()
        np.testing.assert_array_equal(uniform[n], expected)
        expected = tf.random.stateless_normal(shape, [seed, counter], alg="philox").numpy()
        np.testing.assert_allclose(normal[n], expected, rtol=3e-7, atol=3e-8)
        assert np.mean(normal[n] == expected) > 0.9


def test_batch_independent_and_one_graph_for_every_batch_size():
    """A seed's draw does not depend on the rest of the batch, and one traced graph (no loop
    over the batch) serves every batch size, also under XLA."""
    draw = tf.function(lambda seeds, counter: philox.normal(seeds, counter, (4, 4, 3)),
                       input_signature=[tf.TensorSpec([None], tf.int64),
                                        tf.TensorSpec([], tf.int64)])
    ops = {op.type for op in draw.get_concrete_function().graph.get_operations()}
    assert not ops & {"While", "StatelessWhile", "TensorListReserve"}
    seeds = tf.constant(SEEDS)
    batch = draw(seeds, 5).numpy()
    for n in range(len(SEEDS)):
        np.testing.assert_array_equal(draw(seeds[n:n + 1], 5).numpy()[0], batch[n])
    xla = tf.function(draw.python_function, jit_compile=True)(seeds, tf.constant(5, tf.int64))
    np.testing.assert_allclose(xla.numpy(), batch, rtol=1e-6, atol=1e-6)


def test_normal_moments():
    z = philox.normal(tf.range(2000, dtype=tf.int64), 3, (8, 8, 1)).numpy().ravel()
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 4 * np.sqrt(2 / z.size)
