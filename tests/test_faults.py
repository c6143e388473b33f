"""Faults a long training meets, with real files and processes: kill -9 during saves, corrupt
or missing checkpoints and state files, a changed architecture, two trainers on one workdir.
Nothing may be lost, overwritten or mixed, and training never goes back to step 0 on top of
its own checkpoints."""
import glob
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ncsn_tf.training import checkpoints, workdir_lock
from test_train import REPO, _argv, _env, run_cli

FAST = dict(preset="digits", ngf=4, num_scales=4, test_freq=0, snapshot_sampling=False,
            snapshot_freq=2, keep_every=4)


def _files(workdir: Path) -> dict[str, bytes]:
    """Every checkpoint file of the workdir and its bytes."""
    return {p: Path(p).read_bytes()
            for p in glob.glob(str(workdir / "checkpoints" / "**" / "ckpt-*"), recursive=True)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workdir trained to step 8 (rotated 4, 6, 8; kept 4, 8; EMA 2 … 8)."""
    workdir = tmp_path_factory.mktemp("faults") / "run"
    assert run_cli(**FAST, workdir=workdir, n_iters=8) == 0
    return workdir


def _copy(trained: Path, tmp_path: Path) -> Path:
    import shutil
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_corrupt_latest_checkpoint_resumes_from_the_one_before(trained, tmp_path, caplog):
    workdir = _copy(trained, tmp_path)
    data = workdir / "checkpoints" / "ckpt-8.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])  # a save cut short
    kept = workdir / "checkpoints" / "kept" / "ckpt-8.data-00000-of-00001"
    flipped = bytearray(kept.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # and a bit flip in its kept copy
    kept.write_bytes(bytes(flipped))
    with pytest.raises(checkpoints.CheckpointError, match="Cannot read the checkpoint"):
        checkpoints.load(str(workdir / "checkpoints" / "kept" / "ckpt-8"), ema=False)
    before = {p: b for p, b in _files(workdir).items() if "ckpt-6" in p}
    caplog.set_level(logging.INFO, logger="absl")
    assert run_cli(**FAST, workdir=workdir, n_iters=10) == 0
    assert f"Resumed from {workdir}/checkpoints/ckpt-6" in caplog.text
    # The unreadable files and the EMA snapshot the resumed run wrote again are set aside.
    assert (workdir / "checkpoints" / "set_aside" / "ckpt-8.index").exists()
    assert (workdir / "checkpoints" / "kept" / "set_aside" / "ckpt-8.index").exists()
    assert (workdir / "checkpoints" / "ema" / "set_aside" / "ckpt-8.index").exists()
    assert all(_files(workdir)[p] == b for p, b in before.items())  # step 6 untouched
    assert checkpoints.load(str(workdir))[2] == 10
    for _, prefix in checkpoints.checkpoint_prefixes(workdir):
        checkpoints.verify(prefix)


def test_missing_state_file_or_index_never_restarts_from_zero(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    (workdir / "checkpoints" / "checkpoint").unlink()
    (workdir / "checkpoints" / "ckpt-8.index").unlink()  # the rotated one; kept/ckpt-8 is whole
    before = _files(workdir)
    assert run_cli(**FAST, workdir=workdir, n_iters=10) == 0
    after = _files(workdir)
    assert checkpoints.load(str(workdir))[2] == 10
    kept_before = {p: b for p, b in before.items() if "/kept/" in p or "/ema/" in p}
    assert all(after[p] == b for p, b in kept_before.items())  # resumed from 8, not 0


def test_no_resumable_checkpoint_refuses_and_changes_nothing(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for prefix in glob.glob(str(workdir / "checkpoints" / "**" / "ckpt-*.data-*"),
                            recursive=True):
        if "/ema/" not in prefix:
            Path(prefix).write_bytes(b"")
    config = (workdir / "config.yaml").read_bytes()
    with pytest.raises(SystemExit, match="no full checkpoint that training can resume from"):
        run_cli(**FAST, workdir=workdir, n_iters=10)
    assert (workdir / "config.yaml").read_bytes() == config
    assert not glob.glob(str(workdir / "checkpoints" / "ckpt-1*"))


def test_changed_architecture_keeps_the_config_and_the_run_usable(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    config = (workdir / "config.yaml").read_bytes()
    with pytest.raises(SystemExit, match="does not fit this model"):
        run_cli(**{**FAST, "ngf": 8}, workdir=workdir, n_iters=10, allow_config_change=True)
    assert (workdir / "config.yaml").read_bytes() == config
    assert checkpoints.load(str(workdir))[2] == 8  # sampling still works


def test_a_second_trainer_refuses_and_a_dead_holders_lock_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "ncsn_tf.train",
               *_argv(**FAST, workdir=workdir, n_iters=100_000)]
    first = subprocess.Popen(command, env=_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((workdir / "checkpoints").glob("ckpt-*.index")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        with pytest.raises(SystemExit, match=f"is being trained by pid {first.pid}"):
            run_cli(**FAST, workdir=workdir, n_iters=100_000)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    holder = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())
    assert holder["pid"] == first.pid  # left behind by kill -9
    step = checkpoints.load(str(workdir))[2]
    assert run_cli(**FAST, workdir=workdir, n_iters=step + 2) == 0  # the dead pid's lock
    assert not (workdir / workdir_lock.LOCK_FILE).exists()
    assert checkpoints.load(str(workdir))[2] == step + 2


def test_lock_of_a_live_process_elsewhere_is_stale_only_without_heartbeat(tmp_path):
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    other = {"host": "elsewhere", "pid": 1, "started": "x", "heartbeat": time.time()}
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1 on elsewhere"):
        lock.__enter__()
    other["heartbeat"] = time.time() - 2 * workdir_lock.STALE_AFTER_S
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(other))
    with lock:
        assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_kill_9_during_saves_never_loses_a_snapshot_or_goes_back(tmp_path):
    """Kills a trainer that saves every step at random moments, again and again: after each
    restart the step only moves forward, and at the end every checkpoint on disk is readable
    and every EMA snapshot at a multiple of keep_every has its kept copy."""
    workdir = tmp_path / "run"
    settings = dict(FAST, snapshot_freq=1, keep_every=2)
    command = [sys.executable, "-m", "ncsn_tf.train",
               *_argv(**settings, workdir=workdir, n_iters=100_000)]
    rng, last_step = random.Random(0), 0
    for attempt in range(5):
        log = tmp_path / f"log{attempt}.txt"
        with open(log, "w") as stderr:
            process = subprocess.Popen(command, env=_env(), cwd=REPO, stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while checkpoints.checkpoint_prefixes(workdir, begin_step=last_step + 1) == []:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside the following saves
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
        steps = [s for s, _ in checkpoints.checkpoint_prefixes(workdir)]
        assert steps[-1] > last_step
        last_step = steps[-1]
    assert run_cli(**settings, workdir=workdir, n_iters=last_step + 2) == 0
    assert checkpoints.load(str(workdir))[2] == last_step + 2
    directory = workdir / "checkpoints"
    for _, prefix in checkpoints.checkpoint_prefixes(workdir):
        checkpoints.verify(prefix)
    ema_steps = [s for s, _ in checkpoints.checkpoint_prefixes(
        workdir, folders=(str(directory / "ema"),))]
    assert ema_steps == list(range(1, last_step + 3))
    for step in ema_steps:
        if step % 2 == 0:
            assert (directory / "kept" / f"ckpt-{step}.index").exists(), step


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs the right to mount, as root in a container has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)  # lazily: TF may hold a file


def test_disk_full_stops_with_one_paragraph_and_leaves_no_partial_files(small_disk):
    workdir = small_disk / "run"
    with pytest.raises(SystemExit) as error:
        run_cli(**{**FAST, "snapshot_freq": 1, "keep_every": 2}, workdir=workdir, n_iters=1000)
    message = str(error.value)
    assert "Disk full while writing the checkpoint of step" in message
    latest = [s for s, _ in checkpoints.checkpoint_prefixes(
        workdir, folders=(str(workdir / "checkpoints"),))][-1]
    assert f"The latest checkpoint (step {latest}) is intact" in message
    assert not glob.glob(str(workdir / "checkpoints" / "**" / "*_temp*"), recursive=True)
    for _, prefix in checkpoints.checkpoint_prefixes(workdir):
        checkpoints.verify(prefix)


def test_damaged_training_data_stops_the_run_with_one_paragraph(tmp_path):
    import numpy as np
    import tensorflow as tf
    from test_data import _frames, _write_records

    images = np.random.default_rng(0).integers(0, 256, (60, 16, 16, 1), np.uint8)
    path = tmp_path / "digits.tfrecords"
    _write_records(path, [{"image": tf.io.encode_png(x).numpy()} for x in images])
    raw = path.read_bytes()
    path.write_bytes(raw[:_frames(path)[50] + 3])  # cut inside a record's length header
    with pytest.raises(SystemExit) as error:
        run_cli(**FAST, dataset=f"tfrecord:{path}", workdir=tmp_path / "run", n_iters=40)
    assert str(error.value).startswith(
        f"ncsn_tf.train: TFRecord file {path} is cut short or corrupt after record 50")
    assert "\n" not in str(error.value)
