"""One trainer per workdir: WORKDIR/train.lock names its holder and carries a heartbeat.

A second trainer on the same workdir refuses at once, naming the holder. A lock left by a
process that died (kill -9, a crash, a preempted machine) is taken over: on the same host when
its pid no longer runs, from any host when its heartbeat is older than `STALE_AFTER_S`.

Local disks and NFS (v3 and later) create the lock file atomically (O_EXCL), so of two
trainers started together exactly one wins. Object stores (gs://, s3://) have no atomic
create: there the lock is written and read back, which catches a second trainer started
seconds later but not two started within the same moment.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import tensorflow as tf
from absl import logging

LOCK_FILE = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds WORKDIR/train.lock for the duration of a run."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._me = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "WorkdirLock":
        tf.io.gfile.makedirs(self.workdir)
        for attempt in range(2):
            if self._create():
                break
            holder = self._read()
            if attempt == 0 and (holder is None or _is_stale(holder)):
                logging.warning("Taking over %s from a trainer that is gone (%s).", self.path,
                                _describe(holder) if holder else "unreadable lock file")
                self._remove_stale()
                continue
            raise WorkdirLockedError(
                f"{self.workdir} is being trained by {_describe(holder)}: two trainers on one "
                "workdir would mix their checkpoints. Wait for that run to finish or stop it, "
                f"or train into another --workdir. If that process is gone, delete {self.path}.")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder and holder.get("pid") == self._me["pid"] and (
                holder.get("host") == self._me["host"]):
            tf.io.gfile.remove(self.path)

    def _create(self) -> bool:
        """Writes the lock file if there is none; whether this process now holds it."""
        text = json.dumps(self._me)
        if "://" not in self.path:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        if tf.io.gfile.exists(self.path):
            return False
        with tf.io.gfile.GFile(self.path, "w") as f:
            f.write(text)
        return self._read() == self._me  # best effort: the last writer wins

    def _read(self) -> dict | None:
        try:
            with tf.io.gfile.GFile(self.path) as f:
                return json.loads(f.read())
        except (tf.errors.NotFoundError, ValueError):
            return None

    def _remove_stale(self) -> None:
        try:
            tf.io.gfile.remove(self.path)
        except tf.errors.NotFoundError:
            pass  # another starter took it over first; O_EXCL decides between us

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._me["heartbeat"] = time.time()
            try:
                with tf.io.gfile.GFile(self.path + ".tmp", "w") as f:
                    f.write(json.dumps(self._me))
                tf.io.gfile.rename(self.path + ".tmp", self.path, overwrite=True)
            except tf.errors.OpError as e:  # a full disk must not stop the training
                logging.warning("Could not refresh %s: %s", self.path, e)


def _is_stale(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False
    return time.time() - float(holder.get("heartbeat", 0)) > STALE_AFTER_S


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}, "
            f"last heartbeat {age:.0f} s ago)")
