"""Keras callbacks that run a `ScoreModel.fit` job: safety, checkpoints, logging, previews.

They count steps as `start_step + batch + 1`, the training step a resumed run continues from,
and act when that step reaches a multiple of their frequency. `NonFiniteLossGuard` must come
first (stop before anything is written; `training.train` puts it there); the others do not
depend on their order. Every process of a multi-worker job
runs them all at the same steps (the chief alone samples); only the chief writes (the others
get no-op TensorBoard writers and a scratch checkpoint directory).
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ncsn_tf import images as image_io, progress, sampling
from ncsn_tf.training import checkpoints


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient; the message names the step and σ."""


def _step_of(start_step: int, batch: int) -> int:
    return start_step + batch + 1


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops training at the first step whose loss is not finite.

    The metrics are window means, so one non-finite step makes them non-finite until the next
    reset: the guard sees it at that very step and raises `NonFiniteLossError`, naming the
    noise-level buckets whose loss went bad, before any checkpoint of that step is written.
    (A non-finite gradient with a finite loss poisons the weights, hence the next loss; the
    `Checkpointer` also refuses to write non-finite weights.)
    """

    def __init__(self, start_step: int, sigmas: np.ndarray, num_buckets: int):
        super().__init__()
        self.start_step = start_step
        self.sigmas = np.asarray(sigmas)
        self.num_buckets = num_buckets

    def bucket_levels(self, k: int) -> tuple[int, int]:
        """First and last noise-level index in loss bucket k (buckets are labels·K // L)."""
        levels = [i for i in range(len(self.sigmas))
                  if i * self.num_buckets // len(self.sigmas) == k]
        return levels[0], levels[-1]

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss", 0.0)
        if math.isfinite(loss):
            return
        step = _step_of(self.start_step, batch)
        buckets = []
        for k in range(self.num_buckets):
            value = logs.get(f"loss_bucket_{k}")
            if value is not None and not math.isfinite(value):
                first, last = self.bucket_levels(k)
                buckets.append(f"levels {first}-{last} (sigma {self.sigmas[first]:.4g} to "
                               f"{self.sigmas[last]:.4g}): {value}")
        where = ("; non-finite loss at noise " + "; ".join(buckets)) if buckets else ""
        raise NonFiniteLossError(
            f"Non-finite loss={loss} at step {step}{where}. Training stopped; no checkpoint of "
            "this step was written, the latest checkpoint is intact. Lower --lr, set "
            "--grad_clip, use --precision=fp32, or check the input data for NaNs; re-running "
            "resumes from the latest checkpoint.")


class ProgressLogger(keras.callbacks.Callback):
    """Every `log_freq` steps: one log line (step, loss, images/s, ETA) and TensorBoard scalars.

    Metrics are means over the steps since the last report: the logger resets the model's
    metrics after reading them.
    images/s counts only the time inside training steps (data wait included, checkpointing
    and sampling excluded). The ETA is the wall-clock rate of everything but the sample grids
    of `snapshots`, plus the grids still due at the duration of the last one (before the
    first, the line says how many will follow).
    """

    def __init__(self, start_step: int, n_iters: int, global_batch: int, log_freq: int,
                 writer: tf.summary.SummaryWriter, learning_rate: Callable[[], float],
                 bucket_descriptions: dict[str, str] | None = None,
                 snapshots: "SnapshotSampler | None" = None,
                 clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.start_step, self.n_iters, self.global_batch = start_step, n_iters, global_batch
        self.log_freq = log_freq
        self.writer, self.learning_rate = writer, learning_rate
        self.bucket_descriptions = bucket_descriptions or {}
        self.snapshots, self.clock = snapshots, clock
        self._step_begin = None
        self._busy = 0.0  # seconds inside train steps since the last report
        self._steps = 0
        self._wall = None  # steps since the first one (which traces) against the wall clock

    def on_train_batch_begin(self, batch, logs=None):
        self._step_begin = self.clock()

    def _clock_without_grids(self) -> float:
        return self.clock() - (sum(self.snapshots.seconds) if self.snapshots else 0.0)

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        step = _step_of(self.start_step, batch)
        if self._wall is None:
            # The first step traces and compiles: leave it out of the rates.
            self._wall = progress.Progress(total=self.n_iters - step,
                                           clock=self._clock_without_grids)
            self._busy, self._steps = 0.0, 0
        else:
            self._busy += now - self._step_begin
            self._steps += 1
            self._wall.advance(1)
        if _due(step, self.log_freq) or step == self.n_iters:
            self._report(step, logs or {})
            self.model.reset_metrics()

    def _report(self, step: int, logs: dict) -> None:
        images_per_second = self.global_batch * self._steps / self._busy if self._busy else 0.0
        eta = self._wall.eta if self._wall.done else None
        grids = self.snapshots.due_after(step, self.n_iters) if self.snapshots else 0
        if grids and self.snapshots.seconds:
            eta = None if eta is None else eta + grids * self.snapshots.seconds[-1]
            grids = 0
        with self.writer.as_default(step=step):
            for key, value in logs.items():
                tf.summary.scalar(scalar_tag(key), value,
                                  description=self.bucket_descriptions.get(key))
            tf.summary.scalar(scalar_tag("learning_rate"), self.learning_rate())
            if self._steps:
                tf.summary.scalar(scalar_tag("images_per_second"), images_per_second)
        extra = "  ".join(f"{k} {v:.4g}" for k, v in sorted(logs.items())
                          if k not in ("loss",) and not k.startswith("loss_bucket"))
        logging.info("step %d/%d (%.1f%%)  loss %.4f  %s  %s img/s  ETA %s%s", step,
                     self.n_iters, 100.0 * step / self.n_iters, logs.get("loss", float("nan")),
                     extra, f"{images_per_second:,.0f}" if self._steps else "-",
                     progress.duration(eta),
                     f" + {grids} sample grid{'s' * (grids > 1)}" if grids else "")
        self._busy, self._steps = 0.0, 0


def scalar_tag(key: str, split: str = "train") -> str:
    """The TensorBoard tag of a logged value, grouped so that the loss comes first:
    loss/train, loss/test; loss_by_level/train_bucket_k; optim/grad_norm, optim/learning_rate;
    perf/images_per_second."""
    if key in ("loss", "test_loss"):
        return f"loss/{split}"
    if "loss_bucket_" in key:
        return f"loss_by_level/{split}_bucket_{key.rsplit('_', 1)[1]}"
    if key in ("grad_norm", "learning_rate"):
        return f"optim/{key}"
    return f"perf/{key}"


class HeldOutLoss(keras.callbacks.Callback):
    """Every `test_freq` steps, the EMA weights' DSM loss on the next held-out batch.

    Runs `ScoreModel.held_out_stats` (draws keyed by the step) under the model's distribution
    strategy on a persistent iterator over the held-out split and logs `test_loss` (and
    `test_loss_bucket_k`). It leaves the model's training metrics alone.
    """

    def __init__(self, start_step: int, test_freq: int, iterator,
                 writer: tf.summary.SummaryWriter):
        super().__init__()
        self.start_step, self.test_freq = start_step, test_freq
        self.iterator, self.writer = iterator, writer
        self._test_fn = None

    def _build(self):
        strategy = self.model.distribute_strategy

        @tf.function
        def test_fn(iterator, step):
            stats, batch = strategy.run(self.model.held_out_stats, args=(next(iterator), step))
            # Every replica holds the same global sums: take the first.
            return (strategy.experimental_local_results(stats)[0],
                    strategy.experimental_local_results(batch)[0])

        return test_fn

    def on_train_batch_end(self, batch, logs=None):
        step = _step_of(self.start_step, batch)
        if not _due(step, self.test_freq):
            return
        if self._test_fn is None:
            self._test_fn = self._build()
        stats, size = self._test_fn(self.iterator, tf.constant(step, tf.int64))
        stats, size = stats.numpy().reshape(-1), float(size.numpy())
        k = (len(stats) - 1) // 2
        results = {"test_loss": stats[0] / size}
        for b in range(k):
            if stats[1 + k + b]:
                results[f"test_loss_bucket_{b}"] = stats[1 + b] / stats[1 + k + b]
        with self.writer.as_default(step=step):
            for key, value in results.items():
                tf.summary.scalar(scalar_tag(key, "test"), value)
        logging.info("step %d  test_loss %.4f (EMA weights, one held-out batch)", step,
                     results["test_loss"])


class Checkpointer(keras.callbacks.Callback):
    """Saves every `snapshot_freq` steps, at the end, and when a stop was requested.

    `request_stop()` (called by the SIGTERM/SIGINT handler of `PreemptionSignals`) makes it
    save at the next step boundary and stop training; `stop_signal` then holds the signal.
    In multi-worker jobs `agree` turns the local request into one all workers share, so all
    of them save and stop at the same step. Before writing, the weights are checked to be
    finite: a NaN checkpoint is never written.
    """

    def __init__(self, start_step: int, snapshot_freq: int, save: Callable[[int], str],
                 weights: Callable[[], list], agree: Callable[[bool], bool] | None = None):
        super().__init__()
        self.start_step, self.snapshot_freq = start_step, snapshot_freq
        self._save, self._weights, self._agree = save, weights, agree
        self.stop_signal: int | None = None
        self.last_saved = start_step
        self.step = start_step

    def request_stop(self, signum: int) -> None:
        self.stop_signal = signum

    def on_train_batch_end(self, batch, logs=None):
        self.step = _step_of(self.start_step, batch)
        stop = self.stop_signal is not None
        if self._agree is not None:
            stop = self._agree(stop)
            if stop and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM  # another worker was told to stop
        if stop or _due(self.step, self.snapshot_freq):
            self.save()
        if stop:
            logging.warning("Stopping at step %d on signal %d; checkpoint saved. Re-run the same "
                            "command to resume.", self.step, self.stop_signal)
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.step != self.last_saved:
            self.save()

    def save(self) -> None:
        if self.step == self.last_saved:
            return
        if not bool(_all_finite([tf.convert_to_tensor(w) for w in self._weights()])):
            raise NonFiniteLossError(
                f"Non-finite weights at step {self.step}; not writing a checkpoint. The latest "
                f"checkpoint (step {self.last_saved}) is intact.")
        try:
            path = self._save(self.step)
        except checkpoints.DiskFullError as e:
            raise checkpoints.DiskFullError(
                f"{e}. The latest checkpoint (step {self.last_saved}) is intact: free space "
                "and re-run the same command to resume from it.") from None
        self.last_saved = self.step
        logging.info("step %d  saved checkpoint %s", self.step, path)


@tf.function
def _all_finite(tensors: list[tf.Tensor]) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors
                          if t.dtype.is_floating])


class PreemptionSignals:
    """Context manager: SIGTERM/SIGINT ask `checkpointer` to save and stop at the next step.

    A second signal of the same kind gets the default behaviour (terminate / KeyboardInterrupt),
    so a stuck job can still be killed. Handlers are installed only in the main thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer
        self._previous = {}

    def _handle(self, signum, frame):
        logging.warning("Received signal %d: saving a checkpoint at the next step, then "
                        "stopping.", signum)
        self.checkpointer.request_stop(signum)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class SnapshotSampler(keras.callbacks.Callback):
    """Every `snapshot_freq` steps: a short annealed Langevin run from the EMA weights.

    The grid goes to `samples_dir/samples_<step>.png` and to TensorBoard as `samples`. The
    same `seeds` every time, so successive grids show the same chains as the model improves.
    """

    def __init__(self, start_step: int, snapshot_freq: int, sampler: sampling.AnnealedLangevin,
                 seeds: np.ndarray, samples_dir: str, writer: tf.summary.SummaryWriter,
                 clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.start_step, self.snapshot_freq = start_step, snapshot_freq
        self.sampler, self.seeds = sampler, seeds
        self.samples_dir, self.writer, self.clock = samples_dir, writer, clock
        self.seconds: list[float] = []  # the duration of each grid so far

    def due_after(self, step: int, end: int) -> int:
        """How many grids come after `step`, up to step `end`."""
        return end // self.snapshot_freq - step // self.snapshot_freq

    def on_train_batch_end(self, batch, logs=None):
        step = _step_of(self.start_step, batch)
        if _due(step, self.snapshot_freq):
            self.sample(step)

    def sample(self, step: int) -> None:
        start = self.clock()
        images = self.sampler.sample(self.seeds)["samples"]
        path = os.path.join(self.samples_dir, f"samples_{step}.png")
        write_grid(images, path, self.writer, "samples", step)
        self.seconds.append(self.clock() - start)
        logging.info("step %d  wrote %s (%d samples, %.1f s)", step, path, len(self.seeds),
                     self.seconds[-1])


def write_grid(images, path: str, writer: tf.summary.SummaryWriter, tag: str,
               step: int) -> None:
    """Saves images [N, H, W, C] in [0, 1] as a PNG grid (small images enlarged to a readable
    size) and logs that grid to TensorBoard."""
    grid = image_io.image_grid(images)
    image_io.save_png(path, grid)
    with writer.as_default(step=step):
        tf.summary.image(tag, grid[None], step=step)
