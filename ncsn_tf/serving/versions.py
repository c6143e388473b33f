"""TF Serving's versioned layout, written atomically: `BASE_PATH/MODEL_NAME/VERSION/`.

VERSION is one more than the highest integer directory already there (TF Serving serves the
highest). Locally the version is filled under a hidden, non-numeric sibling name on the same
filesystem and then renamed, so a server polling the directory never sees half a model.
Object stores (`gs://`, `s3://`) have no atomic rename: there the version is filled in a local
temporary directory and copied into the version prefix with `saved_model.pb` last (see
saved_models/README.md for serving from object stores).
"""
from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Callable

import tensorflow as tf
from absl import logging

TEMP_PREFIX = ".tmp-export-"


def next_version(model_dir: str) -> int:
    """1 + the highest integer-named directory in `model_dir` (1 if none; others ignored)."""
    if not tf.io.gfile.isdir(model_dir):
        return 1
    versions = [int(name.rstrip("/")) for name in tf.io.gfile.listdir(model_dir)
                if name.rstrip("/").isdigit()
                and tf.io.gfile.isdir(os.path.join(model_dir, name.rstrip("/")))]
    return max(versions, default=0) + 1


def _is_local(path: str) -> bool:
    return "://" not in path


_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_model_name(model_name: str) -> str:
    """`model_name` if it names one directory under the base path (not '.', '..', a path, an
    absolute path, empty, or all digits, which TF Serving would take for a version)."""
    if (not isinstance(model_name, str) or not _MODEL_NAME.fullmatch(model_name)
            or model_name.isdigit() or set(model_name) == {"."}):
        raise ValueError(f"model name {model_name!r} must be a plain, non-numeric directory "
                         "name such as 'ncsn' (letters, digits, '_', '-', '.'; no '/', '..')")
    return model_name


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def remove_stale_temp_dirs(model_dir: str, max_age_s: float = 86_400.0) -> list[str]:
    """Removes the staging folders that killed exports left in `model_dir`: those of a process
    of this host that no longer runs, or older than `max_age_s`; never a running export's."""
    removed = []
    host = socket.gethostname()
    for path in glob.glob(os.path.join(model_dir, TEMP_PREFIX + "*")):
        parts = os.path.basename(path)[len(TEMP_PREFIX):].rsplit("-", 2)
        dead = False
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:
                pass
        if dead or time.time() - os.path.getmtime(path) > max_age_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _publish_local(tmp_dir: str, model_dir: str) -> str:
    """Renames `tmp_dir` to the next free version; retries if another export took it."""
    for _ in range(1000):
        target = os.path.join(model_dir, str(next_version(model_dir)))
        try:
            os.rename(tmp_dir, target)
            return target
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise RuntimeError(f"Could not find a free version number in {model_dir}")


def _copy_to_object_store(local_dir: str, model_dir: str) -> str:
    """Copies a finished export into the next version prefix, `saved_model.pb` last (a server
    that looks early finds no loadable model rather than half of one)."""
    target = os.path.join(model_dir, str(next_version(model_dir)))
    files = [os.path.relpath(os.path.join(root, name), local_dir)
             for root, _, names in os.walk(local_dir) for name in names]
    files.sort(key=lambda rel: rel == "saved_model.pb")
    for rel in files:
        dest = os.path.join(target, rel)
        tf.io.gfile.makedirs(os.path.dirname(dest))
        tf.io.gfile.copy(os.path.join(local_dir, rel), dest, overwrite=False)
    return target


def save_version(write: Callable[[str], None], model_dir: str) -> str:
    """Fills the next version directory of `model_dir` by `write(directory)`; returns it.

    Locally `write` fills a hidden non-numeric sibling that is then renamed (atomic); for
    object stores it fills a local directory that is then copied (see `_copy_to_object_store`).
    If `write` raises, no version directory appears and the temporary one is removed.
    """
    if _is_local(model_dir):
        os.makedirs(model_dir, exist_ok=True)
        staging_parent = model_dir  # same filesystem, so the final rename is atomic
        for path in remove_stale_temp_dirs(model_dir):
            logging.warning("Removed %s, left by an export that was killed.", path)
    else:
        tf.io.gfile.makedirs(model_dir)
        staging_parent = None
    tmp_dir = tempfile.mkdtemp(prefix=_temp_prefix(), dir=staging_parent)
    try:
        write(tmp_dir)
        if staging_parent is None:
            return _copy_to_object_store(tmp_dir, model_dir)
        return _publish_local(tmp_dir, model_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


