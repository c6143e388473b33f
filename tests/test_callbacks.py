"""ncsn_tf.training.callbacks: the progress line's rate and ETA on a clock the test controls."""
import logging

import keras
import numpy as np
import tensorflow as tf

from ncsn_tf.training import callbacks


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Sampler:
    """A sample grid that takes 100 s on the test's clock."""

    def __init__(self, clock: _Clock):
        self.clock = clock

    def sample(self, seeds):
        self.clock.now += 100.0
        return {"samples": np.zeros((len(seeds), 4, 4, 1), np.float32)}


def test_eta_counts_the_sample_grids_still_due(tmp_path, caplog):
    clock = _Clock()
    writer = tf.summary.create_noop_writer()
    snapshots = callbacks.SnapshotSampler(0, 4, _Sampler(clock), np.arange(2), str(tmp_path),
                                          writer, clock=clock)
    logger = callbacks.ProgressLogger(0, 8, 16, 2, writer, lambda: 0.1, snapshots=snapshots,
                                      clock=clock)
    one_second_steps = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: setattr(clock, "now", clock.now + 1.0))
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    caplog.set_level(logging.INFO, logger="absl")
    model.fit(np.ones((8, 1)), np.ones((8, 1)), batch_size=1, epochs=1, verbose=0,
              shuffle=False, callbacks=[one_second_steps, logger, snapshots])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")
             and "img/s" in r.getMessage()]
    # One step a second (the first, which traces, is left out of the rate); two grids of
    # 100 s at steps 4 and 8: announced until the first one has been timed, then counted.
    assert [line.split("ETA ")[1] for line in lines] == [
        "0:00:06 + 2 sample grids", "0:00:04 + 1 sample grid", "0:01:42", "0:00:00"]
    assert all(" 16 img/s " in line for line in lines)  # 16 images per 1-second step
    assert snapshots.seconds == [100.0, 100.0]
    assert (tmp_path / "samples_4.png").exists() and (tmp_path / "samples_8.png").exists()
