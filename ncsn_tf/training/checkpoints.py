"""The workdir layout shared by training, sampling, export and the official-checkpoint importer.

    WORKDIR/config.yaml               the resolved config (`write_config`, `read_config`)
    WORKDIR/checkpoints/ckpt-N        the latest snapshots, rotated by a tf.train.CheckpointManager
    WORKDIR/checkpoints/kept/ckpt-N   full snapshots at multiples of `keep_every` steps, kept
                                      (hard links to the rotated files on a local disk)
    WORKDIR/checkpoints/ema/ckpt-N    the EMA weights and step of every snapshot, kept: what
                                      sampling, evaluation and checkpoint sweeps need, at about
                                      a quarter of the size of a full snapshot
    .../set_aside/ckpt-N              files of a checkpoint that could not be read (truncated,
                                      corrupt) or that a resumed run superseded, moved aside
                                      by `restore_latest` rather than deleted or overwritten

A snapshot writes its EMA part, then the rotated checkpoint, then its kept copy, each
complete or absent (the .index comes last): a kill between them leaves a step that is trained
again or resumed from its rotated checkpoint, and `restore_latest` repairs a missing part of
the step it resumes from.

A full checkpoint holds `net` (live weights), `ema_net` (their EMA, used for sampling), `step`
(int64) and, when written by training, `optimizer`; an EMA snapshot holds `ema_net` and `step`.
N is the training step. Paths may be local or any filesystem TensorFlow reads (gs://…).

A network is stored as its ordered weight list (`model.weights`, keys net/0, net/1, …), not as
a Keras object graph: tf.train.Checkpoint does not see Keras 3 layers held in Python lists, and
the list keeps checkpoints independent of how a model nests its layers. Restoring into a
network of another shape fails with a clear error.
"""
from __future__ import annotations

import errno
import os

import keras
import tensorflow as tf
import yaml
from absl import logging

from ncsn_tf import models
from ncsn_tf.config import flags, presets

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
KEPT_DIR = "kept"
EMA_DIR = "ema"
SET_ASIDE_DIR = "set_aside"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, unreadable, or written for something else."""


class DiskFullError(CheckpointError):
    """A save ran out of disk space (what it was writing is removed)."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint's files are missing, truncated or corrupt (`detail`: what TF said)."""

    def __init__(self, prefix: str, error: Exception):
        self.detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        super().__init__(
            f"Cannot read the checkpoint {prefix} ({self.detail}). It is missing, truncated or "
            "corrupt (e.g. a copy or a save that did not finish), or was not written by "
            "TensorFlow: use another checkpoint of the workdir (an earlier ckpt-N in "
            "WORKDIR/checkpoints or WORKDIR/checkpoints/kept). Training resumes from the "
            "newest readable one by itself.")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def write_config(workdir: str, config: presets.Config) -> str:
    """Writes WORKDIR/config.yaml (atomically) and returns its path."""
    tf.io.gfile.makedirs(workdir)
    path = config_path(workdir)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        f.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    return path


def read_config(workdir: str, missing_ok: bool = False) -> presets.Config | None:
    """The config saved in WORKDIR/config.yaml; None for a new workdir when `missing_ok`."""
    path = config_path(workdir)
    if not tf.io.gfile.exists(path):
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path} not found: {workdir} is not an ncsn_tf workdir (train "
                                "into it, or import an official checkpoint with ncsn_tf.convert)")
    return presets.Config.from_dict(flags.read_yaml(path))


def config_of(path: str) -> presets.Config:
    """The config of a workdir or checkpoint prefix, read without building or restoring
    anything (so that a CLI can refuse a request before loading a model)."""
    return read_config(_locate(path)[0])


def make_checkpoint(net: keras.Model, ema_net: keras.Model, step: tf.Variable,
                    optimizer: keras.optimizers.Optimizer | None = None) -> tf.train.Checkpoint:
    """A checkpoint of the two networks, the training step (an int64 variable, e.g.
    `ScoreModel.step`) and, for training, the optimizer. Build the optimizer
    (`ScoreModel.compile` does) before restoring into it.
    """
    objects = dict(net=net.weights, ema_net=ema_net.weights, step=step)
    if optimizer is not None:
        objects["optimizer"] = optimizer
    return tf.train.Checkpoint(**objects)


def make_manager(workdir: str, checkpoint: tf.train.Checkpoint,
                 max_to_keep: int = 3) -> tf.train.CheckpointManager:
    """Rotates the latest `max_to_keep` snapshots in WORKDIR/checkpoints."""
    return tf.train.CheckpointManager(checkpoint, checkpoint_dir(workdir), max_to_keep)


def save(manager: tf.train.CheckpointManager, step: int, keep_every: int = 0,
         keep_ema: bool = True) -> str:
    """Saves WORKDIR/checkpoints/ckpt-<step>; at multiples of `keep_every` (0: never) also
    keeps it in WORKDIR/checkpoints/kept/ (`_keep`), and with `keep_ema` writes the EMA
    weights and step to WORKDIR/checkpoints/ema/; rotation deletes neither. Returns the
    prefix."""
    step = int(step)
    try:
        if keep_ema:
            _write_ema(manager.checkpoint, manager.directory, step)
        prefix = manager.save(checkpoint_number=step)
        if keep_every and step % keep_every == 0:
            _keep(prefix, os.path.join(manager.directory, KEPT_DIR, f"ckpt-{step}"))
        return prefix
    except (tf.errors.ResourceExhaustedError, OSError) as e:
        if not isinstance(e, tf.errors.ResourceExhaustedError) and e.errno != errno.ENOSPC:
            raise
        for folder in (manager.directory, os.path.join(manager.directory, KEPT_DIR),
                       os.path.join(manager.directory, EMA_DIR)):
            for temp in tf.io.gfile.glob(os.path.join(folder, f"ckpt-{step}_temp*")):
                if tf.io.gfile.isdir(temp):
                    tf.io.gfile.rmtree(temp)
                else:
                    tf.io.gfile.remove(temp)
        raise DiskFullError(f"Disk full while writing the checkpoint of step {step} in "
                            f"{manager.directory} (its partial files are removed)") from None


def _keep(prefix: str, kept_prefix: str) -> str:
    """The kept/ copy of a full checkpoint: hard links on a local disk (its bytes are stored
    once; rotation removes only the rotated names), a copy where links are not available
    (gs://, ...). The .index comes last, so a kill leaves the copy complete or absent."""
    tf.io.gfile.makedirs(os.path.dirname(kept_prefix))
    for path in sorted(tf.io.gfile.glob(prefix + ".*"), key=lambda p: p.endswith(".index")):
        target = kept_prefix + path[len(prefix):]
        if tf.io.gfile.exists(target):  # left by a kill during an earlier try
            tf.io.gfile.remove(target)
        try:
            os.link(path, target)
        except OSError:
            tf.io.gfile.copy(path, target + ".tmp", overwrite=True)
            tf.io.gfile.rename(target + ".tmp", target, overwrite=True)
    return kept_prefix


def _write_ema(checkpoint: tf.train.Checkpoint, directory: str, step: int) -> str:
    snapshot = tf.train.Checkpoint(ema_net=checkpoint.ema_net, step=checkpoint.step)
    return _write(snapshot, os.path.join(directory, EMA_DIR, f"ckpt-{step}"))


def _write(checkpoint: tf.train.Checkpoint, prefix: str) -> str:
    """`checkpoint.write(prefix)` with the save counter that every reader expects."""
    checkpoint.save_counter  # noqa: B018 (created on access)
    return checkpoint.write(prefix)


def save_converted(workdir: str, config: presets.Config, net: keras.Model,
                   ema_net: keras.Model, step: int) -> str:
    """Creates a workdir from imported weights (config + checkpoint, no optimizer); returns
    the checkpoint prefix. Refuses to write into a workdir that already has checkpoints."""
    if tf.train.latest_checkpoint(checkpoint_dir(workdir)):
        raise FileExistsError(f"{checkpoint_dir(workdir)} already holds checkpoints; convert "
                              "into a new workdir")
    write_config(workdir, config)
    checkpoint = make_checkpoint(net, ema_net, step=tf.Variable(int(step), dtype=tf.int64))
    return make_manager(workdir, checkpoint).save(checkpoint_number=int(step))


def load(path: str, ema: bool = True,
         precision: str | None = None) -> tuple[keras.Model, presets.Config, int]:
    """(network, config, step) from a workdir (its latest checkpoint) or a checkpoint prefix
    such as WORKDIR/checkpoints/ckpt-5000.

    Builds the network with `models.build(config)` and restores the EMA weights (`ema=True`,
    what sampling should use) or the live ones. `precision` (fp32 | bf16 | fp16) overrides the
    precision the run was trained with.
    """
    workdir, prefix = _locate(path)
    config = read_config(workdir)
    if precision is not None:
        config = presets.override(config, precision=precision)
    name = "ema_net" if ema else "net"
    missing = {name, "step"} - contents(prefix)
    if missing:
        raise CheckpointError(
            f"{prefix} holds no {' or '.join(sorted(missing))}"
            + ("; it is an EMA snapshot (EMA weights only): use the EMA weights, or a full "
               "checkpoint in WORKDIR/checkpoints/" if missing == {"net"} else
               "; it was not written by ncsn_tf.training.checkpoints"))
    verify(prefix)
    net = models.build(config)
    step = tf.Variable(0, dtype=tf.int64)
    try:
        status = tf.train.Checkpoint(**{name: net.weights}, step=step).restore(prefix)
        status.expect_partial()  # the other network and the optimizer are not needed here
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(f"{prefix}: its `{name}` does not match the network that "
                         f"{os.path.join(workdir, CONFIG_FILE)} describes ({detail})") from None
    return net, config, int(step.numpy())


def contents(prefix: str) -> set[str]:
    """The top-level objects a checkpoint holds (net, ema_net, step, optimizer, ...).

    Raises `CheckpointError`, naming the file and what to do, when it cannot be read (missing,
    truncated, corrupt, or not a TensorFlow checkpoint)."""
    try:
        keys = [key for key, _ in tf.train.list_variables(prefix)]
    except (tf.errors.OpError, ValueError) as e:
        raise UnreadableCheckpointError(prefix, e) from None
    return {key.split("/")[0] for key in keys} - {"_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"}


def verify(prefix: str) -> None:
    """Reads every tensor of a checkpoint (TensorFlow checks each one's checksum); raises
    `UnreadableCheckpointError` naming the file when one cannot be read."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: truncated .data
        raise UnreadableCheckpointError(prefix, e) from None


def restore_ema(prefix: str, ema_net: keras.Model) -> None:
    """Restores only the EMA weights of a checkpoint into `ema_net` (what evaluating a
    checkpoint needs; its optimizer state and live weights are not read)."""
    if "ema_net" not in contents(prefix):
        raise CheckpointError(f"{prefix} holds no EMA weights to evaluate")
    status = tf.train.Checkpoint(ema_net=ema_net.weights).restore(prefix)
    status.assert_existing_objects_matched().expect_partial()


def restore(prefix: str, *, net: keras.Model, ema_net: keras.Model, step: tf.Variable,
            optimizer: keras.optimizers.Optimizer | None = None) -> bool:
    """Restores a full checkpoint into the networks, step and (when it holds one) optimizer.

    Returns whether optimizer state was restored: a converted official checkpoint has none,
    and the optimizer then keeps its fresh state. Raises `CheckpointError` (one paragraph:
    the file and what to do) when the checkpoint cannot be read or does not fit.
    """
    found = contents(prefix)
    verify(prefix)  # unreadable files are not blamed on the architecture
    missing = {"net", "ema_net", "step"} - found
    if missing:
        raise CheckpointError(
            f"{prefix} holds no {', '.join(sorted(missing))}: it is not a full ncsn_tf "
            "checkpoint (an EMA snapshot, or a checkpoint of another program). Resume from a "
            "checkpoint in WORKDIR/checkpoints/ or WORKDIR/checkpoints/kept/, or import "
            "official PyTorch weights with `python -m ncsn_tf.convert`.")
    with_optimizer = optimizer is not None and "optimizer" in found
    objects = dict(net=net.weights, ema_net=ema_net.weights, step=step)
    if with_optimizer:
        objects["optimizer"] = optimizer
    try:
        status = tf.train.Checkpoint(**objects).restore(prefix)
        status.assert_existing_objects_matched()
        status.expect_partial()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(
            f"The checkpoint {prefix} does not fit this model ({detail}): it was written for "
            "another architecture or settings (ngf, channels, number of noise levels) or by "
            "another version. Train into a new --workdir, or resume with the config saved "
            "next to the checkpoint (WORKDIR/config.yaml).") from None
    return with_optimizer


def restore_latest(workdir: str, *, net: keras.Model, ema_net: keras.Model, step: tf.Variable,
                   optimizer: keras.optimizers.Optimizer, keep_every: int = 0,
                   keep_ema: bool = True) -> tuple[str | None, bool]:
    """Restores the newest readable full checkpoint of the workdir (rotated or kept, found on
    disk, whatever WORKDIR/checkpoints/checkpoint says): (its prefix, whether it held
    optimizer state), or (None, False) for a workdir without checkpoints.

    Newer checkpoints that cannot be read, and EMA snapshots newer than the one restored
    (which the resumed run will write again), are moved to a set_aside/ folder beside them,
    never deleted or overwritten. A missing EMA snapshot or kept copy of the restored step
    (a kill between the parts of a save) is written again. Raises `CheckpointError` when
    the workdir holds checkpoints but none that training can resume from: it never starts
    over from step 0 on top of them.
    """
    directory = checkpoint_dir(workdir)
    full = sorted(((n, p) for folder in (directory, os.path.join(directory, KEPT_DIR))
                   for n, p in checkpoint_prefixes(workdir, folders=(folder,))), reverse=True)
    restored, with_optimizer = None, False
    for number, prefix in full:
        try:
            with_optimizer = restore(prefix, net=net, ema_net=ema_net, step=step,
                                     optimizer=optimizer)
        except UnreadableCheckpointError as e:
            logging.warning("Cannot read the checkpoint %s (%s): moved its files to %s; trying "
                            "the one before it.", prefix, e.detail, set_aside(prefix))
            continue
        restored = number
        break
    if restored is None:
        left = checkpoint_prefixes(workdir)
        if left:
            raise CheckpointError(
                f"{directory} holds checkpoints ({', '.join(p for _, p in left)}) but no full "
                "checkpoint that training can resume from (unreadable ones are in "
                f"{SET_ASIDE_DIR}/ folders). Nothing was overwritten. Train into a new "
                "--workdir, and fine-tune from an EMA snapshot with --init_from=PREFIX.")
        return None, False
    for _, newer in checkpoint_prefixes(workdir, begin_step=restored + 1):
        logging.warning("Moved %s to %s: it is newer than the checkpoint the run resumes from "
                        "(step %d), which will write its step again.", newer,
                        set_aside(newer), restored)
    checkpoint = make_checkpoint(net, ema_net, step, optimizer)
    ema_prefix = os.path.join(directory, EMA_DIR, f"ckpt-{restored}")
    if keep_ema and not tf.io.gfile.exists(ema_prefix + ".index"):
        logging.warning("Repaired the missing EMA snapshot %s", _write_ema(checkpoint, directory,
                                                                           restored))
    kept_prefix = os.path.join(directory, KEPT_DIR, f"ckpt-{restored}")
    if keep_every and restored % keep_every == 0 and not tf.io.gfile.exists(
            kept_prefix + ".index"):  # so the restored one is the rotated checkpoint
        logging.warning("Repaired the missing kept copy %s", _keep(prefix, kept_prefix))
    rotated = [p for n, p in checkpoint_prefixes(workdir, folders=(directory,))]
    if rotated:  # the rotation list, whatever state file was there
        times = [tf.io.gfile.stat(p + ".index").mtime_nsec / 1e9 for p in rotated]
        tf.compat.v1.train.update_checkpoint_state(
            directory, rotated[-1], rotated, all_model_checkpoint_timestamps=times,
            last_preserved_timestamp=min(times) - 1.0)
    return prefix, with_optimizer


def set_aside(prefix: str) -> str:
    """Moves a checkpoint's files into a set_aside/ folder beside them; returns the new
    prefix (a later copy of the same step gets a numbered name)."""
    folder, name = os.path.split(prefix)
    target_dir = os.path.join(folder, SET_ASIDE_DIR)
    tf.io.gfile.makedirs(target_dir)
    target, copy = os.path.join(target_dir, name), 1
    while tf.io.gfile.glob(target + ".*"):
        target, copy = os.path.join(target_dir, f"{name}.{copy}"), copy + 1
    for path in tf.io.gfile.glob(prefix + ".*"):
        tf.io.gfile.rename(path, target + path[len(prefix):])
    return target


def checkpoint_prefixes(workdir: str, begin_step: int | None = None,
                        end_step: int | None = None, folders: tuple[str, ...] | None = None
                        ) -> list[tuple[int, str]]:
    """(step, prefix) of the checkpoints of a workdir by step, full ones (rotated or kept)
    preferred over EMA snapshots of the same step; only those with
    begin_step <= step <= end_step when given, and only in `folders` when given."""
    found: dict[int, str] = {}
    directory = checkpoint_dir(workdir)
    for folder in folders or (directory, os.path.join(directory, KEPT_DIR),
                              os.path.join(directory, EMA_DIR)):
        for index in tf.io.gfile.glob(os.path.join(folder, "ckpt-*.index")):
            number = os.path.basename(index)[len("ckpt-"):-len(".index")]
            if number.isdigit():
                found.setdefault(int(number), index[:-len(".index")])
    return [(step, found[step]) for step in sorted(found)
            if (begin_step is None or step >= begin_step)
            and (end_step is None or step <= end_step)]


def _locate(path: str) -> tuple[str, str]:
    """(workdir, checkpoint prefix) for a workdir or a checkpoint prefix."""
    if tf.io.gfile.isdir(path):
        read_config(path)  # a clear error if this is not a workdir
        prefix = tf.train.latest_checkpoint(checkpoint_dir(path))
        if prefix is None:
            raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(path)}; train first or "
                                    "pass a checkpoint prefix (WORKDIR/checkpoints/ckpt-N)")
        return path, prefix
    if tf.io.gfile.exists(path + ".index"):
        # A prefix lives in WORKDIR/checkpoints or WORKDIR/checkpoints/kept.
        parent = os.path.dirname(path)
        for _ in range(3):
            if tf.io.gfile.exists(os.path.join(parent, CONFIG_FILE)):
                return parent, path
            parent = os.path.dirname(parent)
        raise FileNotFoundError(f"No {CONFIG_FILE} found above checkpoint {path}; expected the "
                                "layout WORKDIR/config.yaml + WORKDIR/checkpoints/ckpt-N")
    raise FileNotFoundError(f"{path} is neither a workdir nor a checkpoint prefix (expected "
                            "WORKDIR or WORKDIR/checkpoints/ckpt-N)")
