"""Test setup: quiet TF logs and two logical CPU devices for the tf.distribute tests.

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
