"""Training and checkpoint evaluation of a `ScoreModel`: the library behind `ncsn_tf.train`.

`train(config, workdir)` runs `ScoreModel.fit` under a tf.distribute strategy with the
callbacks of `callbacks`, and resumes from the workdir's latest checkpoint. Workdir:

    WORKDIR/config.yaml        the resolved config (a resumed run must match it)
    WORKDIR/checkpoints/       net, ema_net, step, optimizer (`checkpoints`): the last
                               few, every multiple of keep_every in checkpoints/kept/, and the
                               EMA weights of every snapshot in checkpoints/ema/
    WORKDIR/tensorboard/train  scalars, sample grids, the training-input grid
    WORKDIR/tensorboard/test   `--mode=test`: held-out loss of every checkpoint
    WORKDIR/samples/           PNG grids of the snapshot samples
    WORKDIR/test_losses.csv    `--mode=test` results

Resuming: model, EMA, optimizer and step are restored; the noise draws of `ScoreModel` are
keyed by the step, so they continue exactly. A checkpoint without optimizer state (converted
from the official code) resumes at its step with a fresh optimizer. `RunOptions.init_from`
starts a new run (step 0, fresh optimizer) from the weights of another checkpoint:
fine-tuning. The data order is not restored (a tf.data shuffle buffer is too large to
checkpoint): the pipeline is reseeded with seed + resume step,
so a resumed run sees a fresh shuffle rather than replaying the batches of the first start.

Multi-worker: every worker builds the same input pipeline (same seed, deterministic order)
and tf.distribute keeps each worker's slice of every global batch (AutoShardPolicy.DATA), so
the workers together see exactly the batches a single process would. WORKDIR must be on a
filesystem all workers share (e.g. gs:// or NFS); only the chief writes to it.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ncsn_tf import data, models, noise, sampling
from ncsn_tf.training import callbacks, checkpoints, workdir_lock
from ncsn_tf.config import presets
from ncsn_tf.config.schema import RunOptions
from ncsn_tf.training.score_model import ScoreModel

STRATEGIES = ("mirrored", "multi_worker", "tpu", "one_device")
# Fields a resumed run may change without mixing two different trainings.
HARMLESS_CHANGES = {
    ("data", "data_dir"), ("training", "n_iters"), ("training", "snapshot_freq"),
    ("training", "keep_every"), ("training", "test_freq"), ("training", "log_freq"),
    ("training", "snapshot_sampling"), ("training", "keep_ema_snapshots"),
} | {("sampling", f.name) for f in dataclasses.fields(presets.SamplingConfig)}
MAX_TO_KEEP = 3  # the last few checkpoints, besides those at multiples of keep_every
TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"


class RunConfigError(ValueError):
    """The config does not fit this run: the strategy's replicas or the workdir's past run."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int  # the optimizer step reached
    stop_signal: int | None = None  # the signal that stopped the run early, if any


# ---------------------------------------------------------------------------- strategy

@functools.cache
def create_strategy(name: str = "mirrored", tpu: str | None = None) -> tf.distribute.Strategy:
    """The tf.distribute strategy `name`; create it first thing (before other TF work).

    One instance per (name, tpu) and process: two strategies over the same devices would
    reuse the same collective keys and abort each other's all-reduces (e.g. when a program
    trains and then evaluates), and a multi-worker or TPU cluster is set up only once.
    """
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            logging.warning("--strategy=multi_worker without TF_CONFIG runs a single worker.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the workdir (always, except non-chief workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def check_batch_size(config: presets.Config, strategy: tf.distribute.Strategy) -> None:
    """The global batch must split evenly across the replicas."""
    replicas = strategy.num_replicas_in_sync
    batch = config.training.batch_size
    if batch % replicas:
        lower, upper = batch // replicas * replicas, (batch // replicas + 1) * replicas
        raise RunConfigError(f"--batch_size={batch} (the global batch) must be divisible by the "
                         f"{replicas} replicas of this strategy; use e.g. "
                         f"{lower or upper} or {upper}.")


# ---------------------------------------------------------------------------- workdir

def config_changes(old: presets.Config, new: presets.Config) -> list[tuple[str, str, object,
                                                                           object]]:
    """(section, field, old value, new value) for every field that differs."""
    old_d, new_d = old.to_dict(), new.to_dict()
    changes = []
    for section in presets.SECTIONS:
        for field, value in new_d[section].items():
            if old_d[section].get(field) != value:
                changes.append((section, field, old_d[section].get(field), value))
    if old.name != new.name:
        changes.append(("", "name", old.name, new.name))
    return changes


def prepare_workdir(config: presets.Config, workdir: str, *, write: bool = True,
                    allow_config_change: bool = False) -> None:
    """Checks `config` against the workdir's previous run and writes it as config.yaml.

    Once the workdir holds a checkpoint, changes that keep the training the same (n_iters,
    logging/snapshot frequencies, sampling settings, data_dir) are logged and others raise
    `RunConfigError` unless `allow_config_change`. Before that, any change is accepted.
    """
    previous = checkpoints.read_config(workdir, missing_ok=True)
    changes = config_changes(previous, config) if previous is not None else []
    if changes:
        listing = "; ".join(f"{s + '.' if s else ''}{f}: {a!r} -> {b!r}"
                            for s, f, a, b in changes)
        harmful = [c for c in changes if (c[0], c[1]) not in HARMLESS_CHANGES]
        trained = bool(checkpoints.checkpoint_prefixes(workdir))
        if trained and harmful and not allow_config_change:
            raise RunConfigError(
                f"{workdir} holds a run with a different config ({listing}). Resuming would mix "
                "two different trainings. Use a new --workdir, drop the changed flags to resume "
                "the run as it was, or pass --allow_config_change to continue this run with "
                "the new settings.")
        logging.warning("Config changes in %s: %s", workdir, listing)
    if write:
        checkpoints.write_config(workdir, config)


def _checkpoint_manager(model: ScoreModel, workdir: str) -> tf.train.CheckpointManager:
    checkpoint = checkpoints.make_checkpoint(model.net, model.ema_net, model.step,
                                             optimizer=model.optimizer)
    return checkpoints.make_manager(workdir, checkpoint, MAX_TO_KEEP)


# Settings that decide the shapes of a network's weights.
_ARCHITECTURE = ("arch", "ngf", "channels")


def initialize_from(model: ScoreModel, config: presets.Config, source: str) -> int:
    """Copies the live and EMA weights of `source` (a workdir or checkpoint prefix) into
    `model`, keeping `config`'s σ table; returns the source's step.

    An EMA snapshot (no live weights) initialises both networks from its EMA weights. Raises
    `RunConfigError` naming the settings that differ when the architectures do not match.
    """
    ema, source_config, step = checkpoints.load(source, ema=True)
    try:
        live, _, _ = checkpoints.load(source, ema=False)
    except checkpoints.CheckpointError:
        logging.warning("%s holds EMA weights only: both networks start from them.", source)
        live = ema
    mine = dict(arch=models.arch_name(config), ngf=config.model.ngf,
                channels=config.data.channels)
    theirs = dict(arch=models.arch_name(source_config), ngf=source_config.model.ngf,
                  channels=source_config.data.channels)
    differ = [f"{k}: {theirs[k]!r} there, {mine[k]!r} here" for k in _ARCHITECTURE
              if mine[k] != theirs[k]]
    if differ:
        raise RunConfigError(
            f"--init_from={source} has another architecture ({'; '.join(differ)}). Pass the "
            "same settings (e.g. --arch, --ngf, --channels) to fine-tune from it.")
    for target, origin in ((model.net, live), (model.ema_net, ema)):
        for t, o in zip(target.trainable_weights, origin.trainable_weights):
            t.assign(o)
    return step


# ---------------------------------------------------------------------------- train

def train(config: presets.Config, workdir: str, options: RunOptions = RunOptions(),
          strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Trains (or resumes) `config` in `workdir` until `config.training.n_iters` steps.

    Seeds Keras/TF/NumPy globally with `config.training.seed` (reproducible initial weights).
    Raises `RunConfigError` when the config does not fit the strategy or the workdir's earlier
    run, `workdir_lock.WorkdirLockedError` when another trainer holds the workdir,
    `checkpoints.CheckpointError` when its checkpoints cannot be resumed, and
    `callbacks.NonFiniteLossError` when the loss diverges. A SIGTERM/SIGINT saves a
    checkpoint and returns early with `stop_signal` set. The workdir's config.yaml is written
    only once the run's checkpoint (if any) has been restored.
    """
    strategy = strategy or create_strategy(options.strategy, options.tpu)
    check_batch_size(config, strategy)
    chief = is_chief(strategy)
    with workdir_lock.WorkdirLock(workdir) if chief else contextlib.nullcontext():
        return _train(config, workdir, options, strategy, chief)


def _train(config: presets.Config, workdir: str, options: RunOptions,
           strategy: tf.distribute.Strategy, chief: bool) -> TrainResult:
    prepare_workdir(config, workdir, write=False,
                    allow_config_change=options.allow_config_change)
    t = config.training
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)

    # Before the input pipeline: tf.data's seeded shuffle also depends on the global seed.
    keras.utils.set_random_seed(t.seed)
    # The input pipeline first: missing data fail before the model is built. It is seeded
    # by the resume step, so that a resumed run does not replay the batches already seen.
    def train_data(resume_step: int) -> tf.data.Dataset:
        return _distributable(data.load(
            config, "train", training=True, batch_size=t.batch_size, seed=t.seed + resume_step,
            deterministic=options.deterministic_data or multi_worker))

    directory = checkpoints.checkpoint_dir(workdir)
    newest = checkpoints.checkpoint_prefixes(
        workdir, folders=(directory, os.path.join(directory, checkpoints.KEPT_DIR)))
    planned_step = newest[-1][0] if newest else 0
    train_ds = train_data(planned_step)

    with strategy.scope():
        model = ScoreModel(config)
        model.compile(jit_compile=options.jit_compile)
    if multi_worker:
        _give_step_outputs_a_batch_axis(model)
    latest, with_optimizer = checkpoints.restore_latest(
        workdir, net=model.net, ema_net=model.ema_net, step=model.step,
        optimizer=model.optimizer, keep_every=t.keep_every if chief else 0,
        keep_ema=chief and t.keep_ema_snapshots)
    manager = _checkpoint_manager(model, workdir)
    if latest:
        if options.init_from:
            logging.warning("Ignoring --init_from=%s: %s already holds a checkpoint; resuming "
                            "it.", options.init_from, workdir)
        if with_optimizer:
            logging.info("Resumed from %s", latest)
        else:
            logging.warning("Resumed from %s, which holds no optimizer state (e.g. converted "
                            "from an official checkpoint): the live and EMA weights and the "
                            "step are restored, Adam starts fresh.", latest)
    elif options.init_from:
        source_step = initialize_from(model, config, options.init_from)
        logging.info("Starting from the live and EMA weights of %s (its step %d); step 0, "
                     "fresh optimizer.", options.init_from, source_step)
    start_step = int(model.step.numpy())
    if chief:
        checkpoints.write_config(workdir, config)
    if start_step != planned_step:  # resumed from an earlier checkpoint than the newest
        train_ds = train_data(start_step)
    if start_step >= t.n_iters:
        logging.info("%s is already trained to step %d (n_iters=%d); nothing to do. Raise "
                     "--n_iters to train longer.", workdir, start_step, t.n_iters)
        return TrainResult(start_step)

    writer = (tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR, "train"))
              if chief else tf.summary.create_noop_writer())
    # Non-chief workers save to a private scratch directory (all workers must take part in
    # saving under MultiWorkerMirroredStrategy); only the chief's checkpoint counts.
    scratch = None if chief else tempfile.mkdtemp(prefix="ncsn_tf_worker_")
    saver = manager if chief else _checkpoint_manager(model, scratch)
    checkpointer = callbacks.Checkpointer(
        start_step, t.snapshot_freq,
        lambda step: checkpoints.save(saver, step, t.keep_every if chief else 0,
                                      keep_ema=chief and t.keep_ema_snapshots),
        lambda: model.net.weights + model.ema_net.weights,
        agree=_any_worker(strategy) if multi_worker else None)
    fit_callbacks = _callbacks(config, model, workdir, strategy, options, start_step, writer,
                               checkpointer, chief)
    if chief:
        _write_training_inputs(config, workdir, writer, start_step)

    logging.info("Training %s (%s, %d replicas, global batch %d) from step %d to %d in %s; "
                 "watch it with: tensorboard --logdir %s", config.name,
                 type(strategy).__name__, strategy.num_replicas_in_sync, t.batch_size,
                 start_step, t.n_iters, workdir, os.path.join(workdir, TENSORBOARD_DIR))
    try:
        with callbacks.PreemptionSignals(checkpointer):
            model.fit(train_ds, epochs=1, steps_per_epoch=t.n_iters - start_step, verbose=0,
                      shuffle=False, callbacks=fit_callbacks)
    finally:
        writer.flush()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult(checkpointer.step, checkpointer.stop_signal)


def _callbacks(config: presets.Config, model: ScoreModel, workdir: str,
               strategy: tf.distribute.Strategy, options: RunOptions, start_step: int,
               writer: tf.summary.SummaryWriter, checkpointer: callbacks.Checkpointer,
               chief: bool) -> list[keras.callbacks.Callback]:
    """The fit callbacks, in the order `ncsn_tf.training.callbacks` needs them."""
    t = config.training
    guard = callbacks.NonFiniteLossGuard(start_step, model.net.sigmas.numpy(),
                                         model.num_buckets)
    snapshots = None
    if chief and t.snapshot_sampling and options.snapshot_samples:
        snapshots = callbacks.SnapshotSampler(
            start_step, t.snapshot_freq, _snapshot_sampler(model, config, options),
            np.arange(options.snapshot_samples), os.path.join(workdir, SAMPLES_DIR), writer)
    out = [guard, callbacks.ProgressLogger(
        start_step, t.n_iters, t.batch_size, t.log_freq, writer,
        lambda: float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
        bucket_descriptions=_bucket_descriptions(guard), snapshots=snapshots)]
    test_iterator = _held_out_iterator(config, strategy, t.seed) if t.test_freq else None
    if test_iterator is not None:
        out.append(callbacks.HeldOutLoss(start_step, t.test_freq, test_iterator, writer))
    out.append(checkpointer)
    if snapshots is not None:
        out.append(snapshots)
    if chief:  # what the console would otherwise not explain: a silent wait before `Done`
        out.append(keras.callbacks.LambdaCallback(on_train_end=lambda logs: logging.info(
            "Closing the training input pipeline (TensorFlow waits for its tf.data threads; "
            "this can take up to a minute).")))
    return out


def _give_step_outputs_a_batch_axis(model: keras.Model) -> None:
    """Works around Keras 3 under MultiWorkerMirroredStrategy, which reduces the step outputs
    with `strategy.reduce("MEAN", value, axis=0)` and so fails on scalar metrics
    (tensorflow/tensorflow#72388): a leading axis of 1 lets that reduction succeed and
    remove it again."""
    for name in ("train_step", "test_step"):
        step = getattr(model, name)
        setattr(model, name, lambda data, step=step: {
            key: value[None] for key, value in step(data).items()})


def _distributable(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Shard by data: each worker keeps its slice of every global batch (see module doc)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)


def _any_worker(strategy: tf.distribute.Strategy):
    """A function flag -> whether any worker's flag is set (one small all-reduce)."""

    @tf.function
    def reduce(flag):
        value = strategy.run(lambda f: tf.cast(f, tf.int32), args=(flag,))
        return strategy.reduce("SUM", value, axis=None) > 0

    return lambda flag: bool(reduce(tf.constant(flag)))


def _bucket_descriptions(guard: callbacks.NonFiniteLossGuard) -> dict[str, str]:
    out = {}
    for k in range(guard.num_buckets):
        first, last = guard.bucket_levels(k)
        out[f"loss_bucket_{k}"] = (f"DSM loss of noise levels {first}-{last} (sigma "
                                   f"{guard.sigmas[first]:.4g} to {guard.sigmas[last]:.4g})")
    return out


def _held_out_iterator(config: presets.Config, strategy: tf.distribute.Strategy, seed: int):
    """A distributed iterator cycling over global batches of the held-out split, or None."""
    split = data.eval_split(config)
    try:
        images = data.load(config, split, training=False, seed=seed)
    except (FileNotFoundError, ValueError) as error:
        logging.warning("No held-out loss: the %s split is not available (%s).", split, error)
        return None
    batches = images.repeat().batch(config.training.batch_size, drop_remainder=True)
    return iter(strategy.experimental_distribute_dataset(_distributable(batches)))


def snapshot_levels(num_scales: int, subset: int) -> np.ndarray:
    """Indices of an evenly spread subset of the σ table, first and last level included."""
    if subset <= 0 or subset >= num_scales:
        return np.arange(num_scales)
    return np.unique(np.round(np.linspace(0, num_scales - 1, max(subset, 2))).astype(np.int32))


def _snapshot_sampler(model: ScoreModel, config: presets.Config,
                      options: RunOptions) -> sampling.AnnealedLangevin:
    """Langevin over a subset of levels with the Technique 4 step size for its ratio."""
    sigmas = model.net.sigmas.numpy()
    levels = snapshot_levels(len(sigmas), options.snapshot_num_scales)
    s = config.sampling
    step_lr = s.step_lr
    if len(levels) < len(sigmas):
        step_lr = noise.best_step_lr(s.n_steps_each, float(sigmas[levels[-2]] / sigmas[levels[-1]]),
                                     float(sigmas[-1]))
    level_index = tf.constant(levels, tf.int32)

    def score_fn(x, labels):
        return model.ema_net(x, tf.gather(level_index, labels), training=False)

    return sampling.AnnealedLangevin.from_config(score_fn, sigmas[levels], config,
                                                 step_lr=step_lr)


def _write_training_inputs(config: presets.Config, workdir: str,
                           writer: tf.summary.SummaryWriter, step: int, count: int = 36) -> None:
    """A grid of training images as the model sees them (preprocessed), to check the data."""
    images = next(iter(data.load(config, "train", training=False, batch_size=count)))
    callbacks.write_grid(images, os.path.join(workdir, SAMPLES_DIR, "training_inputs.png"),
                         writer, "training_inputs", step)


# ---------------------------------------------------------------------------- evaluate

def evaluate_checkpoints(config: presets.Config, workdir: str,
                         strategy: tf.distribute.Strategy | None = None,
                         max_batches: int | None = None) -> list[dict[str, float]]:
    """The EMA weights' DSM loss on the held-out split for every checkpoint in the workdir.

    Writes `WORKDIR/test_losses.csv` (step, test_loss, per-bucket losses) and TensorBoard
    scalars under WORKDIR/tensorboard/test. `max_batches` limits the batches per checkpoint
    (None: the whole split). Returns the rows, ordered by step.
    """
    strategy = strategy or create_strategy()
    check_batch_size(config, strategy)
    with strategy.scope():
        model = ScoreModel(config)
        model.compile()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _give_step_outputs_a_batch_axis(model)
    paths = dict(checkpoints.checkpoint_prefixes(workdir))
    if not paths:
        raise FileNotFoundError(f"No checkpoints in {checkpoints.checkpoint_dir(workdir)} to "
                                "evaluate; train first.")
    split = data.eval_split(config)
    test_ds = _distributable(data.load(config, split, training=False,
                                       batch_size=config.training.batch_size,
                                       seed=config.training.seed))
    if max_batches:
        test_ds = test_ds.take(max_batches)
    chief = is_chief(strategy)
    writer = (tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR, "test"))
              if chief else tf.summary.create_noop_writer())
    rows = []
    for step, path in paths.items():
        checkpoints.restore_ema(path, model.ema_net)
        results = model.evaluate(test_ds, verbose=0, return_dict=True)
        row = {"step": step, "test_loss": results["loss"],
               **{k: v for k, v in sorted(results.items()) if k.startswith("loss_bucket_")}}
        rows.append(row)
        with writer.as_default(step=step):
            for key, value in row.items():
                if key != "step":
                    tf.summary.scalar(callbacks.scalar_tag(key, "test"), value)
        logging.info("checkpoint %s  step %d  test_loss %.4f (%s split)", path, step,
                     row["test_loss"], split)
    writer.flush()
    if chief:
        with tf.io.gfile.GFile(os.path.join(workdir, "test_losses.csv"), "w") as f:
            out = csv.DictWriter(f, fieldnames=list(rows[0]))
            out.writeheader()
            out.writerows(rows)
    return rows
