"""Two real worker processes (MultiWorkerMirroredStrategy over 127.0.0.1) against one process.

Identical weights on the two workers would prove nothing (the all-reduce guarantees it); what
counts is that the pair trains exactly like a single process on the same global batches and
seed: each worker keeps its half of every global batch, the noise draws do not depend on the
split, and the gradients are summed once.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from ncsn_tf import training
from ncsn_tf.config import presets

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(ngf=8, num_scales=10, batch_size=8, n_iters=3, snapshot_freq=3, test_freq=0,
                log_freq=1, lr=1e-3, seed=3)
# Float32 sums over a split batch (two halves, all-reduced) differ from one device's sums in
# the last bits. After three Adam steps at lr 1e-3 the weights differed by at most 3e-6 and
# Adam's moments by 3e-6 of their scale in our runs; the tolerances leave headroom, while the
# weights themselves move by ~lr per step, over 100x the weight tolerance (checked below).
ATOL = 2e-5  # weights (net and EMA)
RTOL = 1e-4  # optimizer moments, relative to each variable's largest magnitude


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _variables(prefix: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("net/", "ema_net/", "optimizer/", "step"))}


def test_two_workers_train_like_one_process(tmp_path):
    workdir = tmp_path / "multi_worker"
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    argv = [sys.executable, "-m", "ncsn_tf.train", "--strategy=multi_worker",
            "--dataset=digits", f"--workdir={workdir}", "--nosnapshot_sampling",
            *(f"--{k}={v}" for k, v in SETTINGS.items())]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    workers = [subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**env, "TF_CONFIG": json.dumps({"cluster": cluster,
                                             "task": {"type": "worker", "index": i}})})
        for i in range(2)]
    try:
        # The reference, meanwhile: one process, one device, the same global batches.
        config = presets.override(presets.get("digits"), snapshot_sampling=False, **SETTINGS)
        single = tmp_path / "single"
        result = training.train(config, str(single), training.RunOptions(
            strategy="one_device", deterministic_data=True),
            strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
        assert result.step == 3
        logs = [w.communicate(timeout=300)[1] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log[-4000:]
    assert "2 replicas" in logs[0]

    multi = _variables(str(workdir / "checkpoints" / "ckpt-3"))
    reference = _variables(str(single / "checkpoints" / "ckpt-3"))
    assert set(multi) == set(reference) and any(k.startswith("optimizer/") for k in multi)
    for name in multi:
        difference = float(np.max(np.abs(multi[name] - reference[name])))
        if name.startswith("optimizer/"):  # Adam's moments: sums of squared gradients etc.
            assert difference <= RTOL * float(np.max(np.abs(reference[name]))), name
        else:
            assert difference <= ATOL, name
    # Training moved the weights far more than the tolerance, so the comparison is not vacuous
    # (after 3 steps at EMA rate 0.999 the EMA is still ~ the initial weights).
    moved = max(float(np.max(np.abs(reference[k] - reference[k.replace("net/", "ema_net/")])))
                for k in reference if k.startswith("net/"))
    assert moved > 50 * ATOL, moved
    # Only the chief wrote to the shared workdir.
    assert sorted(p.name for p in (workdir / "checkpoints").glob("ckpt-*.index")) == [
        "ckpt-3.index"]
