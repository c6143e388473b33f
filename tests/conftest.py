"""Test setup: quiet TF logs, two logical CPU devices for the tf.distribute tests, and the
slowest test files first.

Logical devices must be configured before TensorFlow initialises its runtime, so this runs at
import time, before any test module touches TensorFlow.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


@pytest.fixture(autouse=True)
def fresh_collective_keys():
    """Strategies made in earlier tests of this process must not share collective keys with
    the next test's (two MirroredStrategy objects over the same devices otherwise collide in
    their all-reduces); TensorFlow's own tests do the same."""
    tf.distribute.MirroredStrategy._collective_key_base += 100_000


# The slowest files, slowest first (serial seconds on the 2-core machine, from
# `--durations`: about 330, 330, 250, 240, 130, 120, 80, 70, 60). The README's `-n 2 --dist
# loadfile` hands whole files to the two workers in collection order, so starting with these
# lets both workers finish together instead of one running the last big file alone.
_SLOWEST_FIRST = ("test_faults.py", "test_bench.py", "test_export.py", "test_train.py",
                  "test_evaluate.py", "test_pipeline.py", "test_sample_cli.py",
                  "test_samplers.py", "test_sampling.py", "test_multiworker.py",
                  "test_client.py", "test_score_model.py")


def pytest_collection_modifyitems(items):
    """Moves the slowest files to the front; the order within every file is kept."""
    def rank(item):
        name = item.path.name
        return _SLOWEST_FIRST.index(name) if name in _SLOWEST_FIRST else len(_SLOWEST_FIRST)

    items.sort(key=rank)
