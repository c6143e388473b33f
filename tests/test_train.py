"""The training CLI end to end: datasets, checkpoints, TensorBoard, resume after kills, NaN.

Runs use tiny networks (ngf 8, 10 noise levels, batch 8). Most call `ncsn_tf.train.main` in
this process; the kill tests need real subprocesses (SIGKILL cannot be survived in-process).
"""
import csv
import logging
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags as absl_flags

from ncsn_tf import data, train, training
from ncsn_tf.training import callbacks, checkpoints
from ncsn_tf.training.score_model import ScoreModel
from ncsn_tf.config import flags as config_flags
from ncsn_tf.config import presets

REPO = Path(__file__).resolve().parents[1]
TINY = dict(ngf=8, num_scales=10, batch_size=8, log_freq=1, n_steps_each=1,
            snapshot_samples=4, snapshot_num_scales=3)


def _argv(**values) -> list[str]:
    out = []
    for key, value in {**TINY, **values}.items():
        if isinstance(value, bool):
            out.append(f"--{'' if value else 'no'}{key}")
        else:
            out.append(f"--{key}={value}")
    return out


def _parse(argv: list[str]) -> absl_flags.FlagValues:
    flag_values = absl_flags.FlagValues()
    train.define_flags(flag_values)
    flag_values(["ncsn_tf.train", *argv])
    return flag_values


def run_cli(**values) -> int:
    """`python -m ncsn_tf.train` with TINY + `values` as flags, in this process."""
    return train.main(["ncsn_tf.train"], _parse(_argv(**values)))


def read_events(logdir) -> dict[str, dict[int, object]]:
    """tag -> {step: value} from every event file under `logdir` (images as PNG bytes)."""
    out: dict[str, dict[int, object]] = {}
    for path in sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                plugin = value.metadata.plugin_data.plugin_name
                out.setdefault(value.tag, {})[event.step] = (
                    array[2] if plugin == "images" else float(array))
    return out


def run_events(logdir) -> list[dict[str, dict[int, object]]]:
    """`read_events` per event file, i.e. per (re)start of the training, in order of time."""
    files = sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*")),
                   key=os.path.getmtime)
    out = []
    for path in files:
        tags: dict[str, dict[int, object]] = {}
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    tags.setdefault(value.tag, {})[event.step] = float(
                        tf.make_ndarray(value.tensor))
        out.append(tags)
    return out


def _write_images(directory: Path, count: int, size: int = 20, seed: int = 0) -> None:
    """Smooth random RGB blobs as PNGs (varied sizes are resized by the pipeline)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        image = blob[..., None] * rng.uniform(0.3, 1.0, 3)
        png = tf.io.encode_png(tf.constant((image * 255).astype(np.uint8)))
        (directory / f"sub{i % 3}" / f"img{i}.png").parent.mkdir(exist_ok=True)
        (directory / f"sub{i % 3}" / f"img{i}.png").write_bytes(png.numpy())


@pytest.fixture
def online(monkeypatch):
    """TFDS mock data: let the data module believe the download host answers."""
    monkeypatch.setattr(data, "_reachable", lambda url, timeout=3.0: True)


def test_tfds_run_writes_checkpoints_samples_tensorboard_and_test_sweep(tmp_path, online):
    workdir = tmp_path / "run"
    common = dict(dataset="cifar10", workdir=workdir, n_iters=6, snapshot_freq=1, keep_every=3,
                  test_freq=3, log_freq=2)
    with tfds.testing.mock_data(num_examples=24):
        assert run_cli(**common) == 0

        # Checkpoints: the last three rotate, multiples of keep_every stay in kept/.
        ckpt_dir = workdir / "checkpoints"
        assert tf.train.latest_checkpoint(str(ckpt_dir)).endswith("ckpt-6")
        assert sorted(p.name for p in ckpt_dir.glob("ckpt-*.index")) == [
            "ckpt-4.index", "ckpt-5.index", "ckpt-6.index"]
        assert sorted(p.name for p in (ckpt_dir / "kept").glob("ckpt-*.index")) == [
            "ckpt-3.index", "ckpt-6.index"]
        # ...and the EMA weights of every snapshot, for checkpoint sweeps.
        assert sorted(p.name for p in (ckpt_dir / "ema").glob("ckpt-*.index")) == [
            f"ckpt-{s}.index" for s in range(1, 7)]
        net, config, step = checkpoints.load(str(workdir))
        assert step == 6 and config == checkpoints.read_config(str(workdir))
        fields = {**TINY, **common}
        assert config == config_flags.resolve_config(overrides={
            k: v for k, v in fields.items() if k in config_flags.config_fields()})
        assert all(np.isfinite(w.numpy()).all() for w in net.weights)

        # A 2x2 grid of 32 px samples, shown at 64 px, with 2 px padding at every snapshot.
        for s in range(1, 7):
            grid = tf.io.decode_png((workdir / "samples" / f"samples_{s}.png").read_bytes())
            assert grid.shape == (2 + 2 * 66, 2 + 2 * 66, 3)
        assert (workdir / "samples" / "training_inputs.png").exists()

        events = read_events(workdir / "tensorboard" / "train")
        every_log = {"loss/train", "optim/grad_norm", "optim/learning_rate",
                     "perf/images_per_second",
                     *(f"loss_by_level/train_bucket_{k}" for k in range(4))}
        held_out = {tag for tag in events if tag.startswith("loss_by_level/test_bucket_")}
        assert {tag for tag in events if "/" in tag} == every_log | held_out | {"loss/test"}
        assert "loss_by_level/test_bucket_0" in held_out  # (a held-out batch may miss some)
        for tag in every_log:
            assert set(events[tag]) >= {2, 4, 6}, tag
        assert set(events["loss/train"]) == {2, 4, 6}  # every log_freq step
        assert set(events["loss/test"]) == {3, 6}
        assert events["optim/learning_rate"][2] == pytest.approx(1e-4)  # cifar10's lr
        assert all(np.isfinite(v) and v > 0 for v in events["loss/train"].values())
        assert set(events["samples"]) == set(range(1, 7)) and 0 in events["training_inputs"]
        assert tf.io.decode_png(events["samples"][6]).shape == grid.shape

        # --mode=test: the held-out loss of every saved checkpoint, rotated or kept.
        assert run_cli(dataset="cifar10", workdir=workdir, mode="test", **{
            k: v for k, v in common.items() if k not in ("dataset", "workdir")}) == 0
    with open(workdir / "test_losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # EMA snapshots included
    assert all(np.isfinite(float(r["test_loss"])) and float(r["test_loss"]) > 0 for r in rows)
    assert set(rows[0]) == {"step", "test_loss", *(f"loss_bucket_{k}" for k in range(4))}
    sweep = read_events(workdir / "tensorboard" / "test")
    assert sweep["loss/test"] == pytest.approx({int(r["step"]): float(r["test_loss"])
                                                for r in rows})

    # The same workdir with a config that changes training is refused before any work...
    with pytest.raises(SystemExit, match=r"training.batch_size: 8 -> 4"):
        run_cli(**{**common, "batch_size": 4})
    # ...and so are bad values, before the workdir is touched.
    with pytest.raises(SystemExit, match="--lr=-1.0 must be > 0"):
        run_cli(dataset="cifar10", workdir=tmp_path / "never", lr=-1.0)
    with pytest.raises(SystemExit, match="Unknown dataset 'cifar11'. Valid forms: cifar10"):
        run_cli(preset="cifar10", dataset="cifar11", workdir=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="a_file is a file, not a directory"):
        run_cli(preset="digits", workdir=tmp_path / "a_file")


def test_harmless_config_changes_resume_and_others_are_refused(tmp_path):
    config = presets.override(presets.get("digits"), **{k: v for k, v in TINY.items()
                                                         if not k.startswith("snapshot_")})
    training.prepare_workdir(config, str(tmp_path))
    # No checkpoint yet: nothing to mix, so even a new dataset is accepted.
    config = presets.override(config, dataset="folder:/fixed/path", lr=2e-4)
    training.prepare_workdir(config, str(tmp_path))
    assert checkpoints.read_config(str(tmp_path)) == config
    tf.train.Checkpoint(step=tf.Variable(1)).save(str(tmp_path / "checkpoints" / "ckpt"))
    longer = presets.override(config, n_iters=10_000, log_freq=7, step_lr=1e-5,
                              data_dir="/elsewhere")
    training.prepare_workdir(longer, str(tmp_path))  # logged, allowed, written
    assert checkpoints.read_config(str(tmp_path)) == longer
    for change in (dict(lr=3e-4), dict(num_scales=11), dict(ngf=16), dict(seed=1),
                   dict(precision="bf16"), dict(random_flip=True), dict(dataset="digits")):
        with pytest.raises(training.RunConfigError, match="--allow_config_change"):
            training.prepare_workdir(presets.override(longer, **change), str(tmp_path))
    training.prepare_workdir(presets.override(longer, lr=3e-4), str(tmp_path),
                             allow_config_change=True)
    assert checkpoints.read_config(str(tmp_path)).optim.lr == 3e-4


def test_batch_must_split_across_replicas():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    training.check_batch_size(presets.override(presets.get("digits"), batch_size=8), strategy)
    with pytest.raises(training.RunConfigError, match=r"--batch_size=7 .* 2 replicas.* 6 or 8"):
        training.check_batch_size(presets.override(presets.get("digits"), batch_size=7),
                                  strategy)


def test_unknown_strategy_is_rejected_at_parse_time():
    with pytest.raises(absl_flags.IllegalFlagValueError):
        _parse(["--workdir=x", "--strategy=parameter_server"])


def test_help_of_every_cli_exits_0_and_lists_its_flags():
    """train lists every config field; sample, export and evaluate their sampler flags; the
    examples keep their `\\` continuations; the client starts without TensorFlow."""
    clis = ("train", "sample", "export", "evaluate", "convert", "configure", "client")
    env = {k: v for k, v in _env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user has it
    runs = {name: subprocess.Popen([sys.executable, "-m", f"ncsn_tf.{name}", "--help"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env, cwd=REPO) for name in clis}
    out = {}
    for name, process in runs.items():
        out[name], errors = process.communicate(timeout=120)
        assert process.returncode == 0, name
        assert errors == "", (name, errors[-2000:])  # TensorFlow's boot lines stay quiet
    assert "Train NCSNv2" in out["train"]
    for field in config_flags.config_fields():
        assert f"--{field}:" in out["train"] or f"--[no]{field}:" in out["train"], field
    for flag in ("--workdir", "--mode", "--strategy", "--tpu", "--[no]jit_compile", "--preset",
                 "--config", "--snapshot_samples", "--snapshot_num_scales"):
        assert flag in out["train"], flag
    for name in ("sample", "export", "evaluate"):
        for flag in ("--sampler:", "--num_steps:", "--churn:", "--eta:", "--corrector_steps:"):
            assert flag in out[name], (name, flag)
    for name in ("sample", "evaluate", "client"):
        assert "\\\n" in out[name], name  # multi-line example commands
    check = subprocess.run([sys.executable, "-c", "import sys, ncsn_tf.client; "
                            "sys.exit('tensorflow' in sys.modules)"], env=_env(), cwd=REPO)
    assert check.returncode == 0


def test_loss_bucket_levels_and_the_non_finite_message():
    sigmas = np.geomspace(10.0, 0.01, 10).astype(np.float32)
    guard = callbacks.NonFiniteLossGuard(100, sigmas, num_buckets=4)
    # Bucket of level i is i * 4 // 10: levels 0-2, 3-4, 5-7, 8-9.
    assert [guard.bucket_levels(k) for k in range(4)] == [(0, 2), (3, 4), (5, 7), (8, 9)]
    guard.on_train_batch_end(4, {"loss": 3.0, "loss_bucket_1": 2.0})  # finite: nothing happens
    logs = {"loss": float("nan"), "grad_norm": 2.0, "loss_bucket_0": 1.0,
            "loss_bucket_1": float("inf"), "loss_bucket_2": float("nan"), "loss_bucket_3": 1.0}
    with pytest.raises(callbacks.NonFiniteLossError) as error:
        guard.on_train_batch_end(4, logs)
    message = str(error.value)
    assert message.startswith("Non-finite loss=nan at step 105")
    assert f"levels 3-4 (sigma {sigmas[3]:.4g} to {sigmas[4]:.4g})" in message
    assert "levels 5-7" in message and "levels 0-2" not in message


def test_snapshot_levels_spread_over_the_table():
    levels = training.snapshot_levels(232, 100)
    assert levels[0] == 0 and levels[-1] == 231 and len(levels) == 100
    assert np.all(np.diff(levels) >= 2) and np.all(np.diff(levels) <= 3)
    np.testing.assert_array_equal(training.snapshot_levels(49, 100), np.arange(49))
    np.testing.assert_array_equal(training.snapshot_levels(49, 0), np.arange(49))


def test_diverging_run_stops_with_a_clear_message_and_no_nan_checkpoint(tmp_path, caplog):
    records = tmp_path / "records.tfrecord"
    with tf.io.TFRecordWriter(str(records)) as writer:
        rng = np.random.default_rng(0)
        for _ in range(40):
            image = rng.integers(0, 256, (16, 16, 3), np.uint8)
            feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[tf.io.encode_png(image).numpy()]))}
            writer.write(tf.train.Example(features=tf.train.Features(
                feature=feature)).SerializeToString())
    workdir = tmp_path / "run"
    # An absurd learning rate makes the weights blow up within a few steps.
    rc = run_cli(preset="digits", dataset=f"tfrecord:{records}", channels=3, workdir=workdir,
                 lr=1e12, n_iters=20, snapshot_freq=1, test_freq=0, snapshot_sampling=False)
    assert rc == 1
    message = next(r.getMessage() for r in caplog.records if "Non-finite" in r.getMessage())
    failed_step = int(message.split(" at step ")[1].split()[0].rstrip(";."))
    assert "sigma" in message and "latest checkpoint is intact" in message
    saved = dict(checkpoints.checkpoint_prefixes(str(workdir)))
    assert saved and max(saved) < failed_step  # nothing written at or after the bad step
    for step, prefix in saved.items():
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.isfinite(value).all(), (step, name)


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _wait_for_checkpoint(workdir: Path, after: int, process, timeout: float = 180) -> int:
    """Polls until a checkpoint newer than step `after` exists; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
        if latest and int(latest.rsplit("-", 1)[1]) > after:
            return int(latest.rsplit("-", 1)[1])
        if process.poll() is not None:
            raise AssertionError(f"training exited early:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no checkpoint after step {after} within {timeout} s")


def test_killed_and_preempted_runs_resume_and_continue_the_loss_curve(tmp_path):
    images = tmp_path / "images"
    _write_images(images, 40)
    (images / "sub0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (images / "notes.txt").write_text("not an image")
    workdir = tmp_path / "run"
    # RGB files read as grayscale; lr 3e-3 makes the loss fall fast (about 4x in 20 steps).
    common = dict(preset="digits", dataset=f"folder:{images}", channels=1, workdir=workdir,
                  lr=3e-3, snapshot_freq=10, test_freq=0, snapshot_sampling=False)
    command = [sys.executable, "-m", "ncsn_tf.train", *_argv(**common, n_iters=100_000)]

    # kill -9 after the first checkpoint: at most one snapshot interval is lost.
    first = subprocess.Popen(command, env=_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(workdir, 0, first)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    killed_at = int(tf.train.latest_checkpoint(str(workdir / "checkpoints")).rsplit("-", 1)[1])

    # The same command resumes; SIGTERM makes it save at the next step and exit with 143.
    second = subprocess.Popen(command, env=_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(workdir, killed_at, second)
        second.send_signal(signal.SIGTERM)
        _, log = second.communicate(timeout=60)
    finally:
        second.kill()
    assert second.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "broken.png: not a readable PNG/JPEG/GIF/BMP image" in log
    stopped_at = int(tf.train.latest_checkpoint(str(workdir / "checkpoints")).rsplit("-", 1)[1])
    assert f"Stopping at step {stopped_at} on signal {int(signal.SIGTERM)}" in log
    assert stopped_at > killed_at

    # Finish in this process: the step counter continues to n_iters.
    assert run_cli(**common, n_iters=stopped_at + 3) == 0
    assert checkpoints.load(str(workdir))[2] == stopped_at + 3

    runs = [r["loss/train"] for r in run_events(workdir / "tensorboard" / "train")
            if "loss/train" in r]
    assert len(runs) == 3
    assert min(runs[1]) == killed_at + 1  # resumed right after the last checkpoint
    assert sorted(runs[2]) == list(range(stopped_at + 1, stopped_at + 4))
    # The loss curve continues where it was: far below its start, near its level at the stop.
    start = np.mean([runs[0][s] for s in sorted(runs[0])[:3]])
    before = np.mean([runs[1][s] for s in sorted(runs[1])[-3:]])
    after = np.mean(list(runs[2].values()))
    assert after < 0.6 * start, (start, before, after)
    assert after < 1.5 * before, (start, before, after)


def test_resume_a_converted_official_checkpoint_and_fine_tune_from_it(tmp_path, caplog):
    """The issue's reproduction: a workdir written by ncsn_tf.convert (no optimizer state)
    resumes at its step with a fresh Adam; --init_from starts a new run at step 0 from its
    live and EMA weights; another architecture is refused with the differing settings."""
    pytest.importorskip("torch")
    from ncsn_tf import convert
    fixture = REPO / "tests" / "fixtures" / "ncsnv2_reference"
    converted = tmp_path / "conv28"
    convert.convert(str(fixture / "ncsnv2_28.pth"), str(fixture / "ncsnv2_28.yml"),
                    str(converted))  # the fixture was saved at step 1000
    digits28 = dict(dataset="digits", image_size=28, channels=1, batch_size=8, log_freq=1,
                    test_freq=0, snapshot_sampling=False, snapshot_freq=1000)
    argv = [f"--config={converted / 'config.yaml'}", f"--workdir={converted}",
            "--n_iters=1002", "--allow_config_change",
            *(f"--{k}={v}" if not isinstance(v, bool) else f"--no{k}"
              for k, v in digits28.items())]
    with caplog.at_level(logging.WARNING, logger="absl"):
        assert train.main(["ncsn_tf.train"], _parse(argv)) == 0
    assert "holds no optimizer state" in caplog.text and "Adam starts fresh" in caplog.text
    _, _, step = checkpoints.load(str(converted))
    assert step == 1002

    source_live, _, _ = checkpoints.load(str(converted / "checkpoints" / "ckpt-1000"), ema=False)
    source_ema, _, _ = checkpoints.load(str(converted / "checkpoints" / "ckpt-1000"))
    config = presets.override(presets.get("digits"), image_size=28, channels=1, ngf=8,
                              num_scales=12)
    model = ScoreModel(config)
    assert training.initialize_from(model, config, str(converted / "checkpoints" /
                                                       "ckpt-1000")) == 1000
    for mine, theirs in ((model.net, source_live), (model.ema_net, source_ema)):
        for a, b in zip(mine.trainable_weights, theirs.trainable_weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert model.net.sigmas.shape == (12,)  # this run's noise levels, not the source's 10

    fine_tuned = tmp_path / "fine_tuned"
    assert run_cli(**digits28, ngf=8, num_scales=12, n_iters=2, workdir=fine_tuned,
                   init_from=converted) == 0
    _, tuned_config, step = checkpoints.load(str(fine_tuned))
    assert step == 2 and tuned_config.model.num_scales == 12
    with pytest.raises(SystemExit, match=r"another architecture \(ngf: 8 there, 4 here\)"):
        run_cli(**digits28, ngf=4, n_iters=2, workdir=tmp_path / "other", init_from=converted)
