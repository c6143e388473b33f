"""Workdir layout: config round trip, converted and training checkpoints, `load`, rotation."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from ncsn_tf import models
from ncsn_tf.training import checkpoints, optimizers
from ncsn_tf.config import presets
from ncsn_tf.training.score_model import ScoreModel
from test_score_model import images, tiny_config, tiny_model, train  # the stand-in setup

CONFIG = presets.override(presets.get("cifar10"), ngf=4, num_scales=10, image_size=8,
                          channels=1, ema_rate=0.9)


def scores(net, seed=0):
    """The network's output on a fixed batch (all noise levels represented)."""
    x = tf.constant(images(4, seed))
    return net(x, tf.constant([0, 3, 6, 9]), training=False).numpy()


def perturb(net, scale, seed=0):
    """Moves every trainable weight, so the two networks of a checkpoint differ."""
    rng = np.random.default_rng(seed)
    for w in net.trainable_weights:
        w.assign(w.numpy() + scale * rng.normal(size=w.shape).astype(np.float32))


def test_config_round_trip(tmp_path):
    workdir = str(tmp_path / "run")
    config = presets.override(CONFIG, precision="bf16", batch_size=7)
    path = checkpoints.write_config(workdir, config)
    assert path == os.path.join(workdir, "config.yaml")
    with open(path) as f:
        assert yaml.safe_load(f) == config.to_dict()
    assert checkpoints.read_config(workdir) == config
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        checkpoints.read_config(str(tmp_path))


@pytest.fixture(scope="module")
def nets():
    """A live and an EMA NCSNv2 (tiny config) with different weights. Building the real network
    costs seconds, so the tests share one pair and must not change it."""
    keras.utils.set_random_seed(0)
    net, ema_net = models.build(CONFIG), models.build(CONFIG)
    perturb(ema_net, 0.05)
    assert not np.allclose(scores(net), scores(ema_net))
    return net, ema_net


def test_converted_checkpoint_loads_either_network(tmp_path, nets):
    workdir = str(tmp_path / "run")
    net, ema_net = nets
    prefix = checkpoints.save_converted(workdir, CONFIG, net, ema_net, step=300000)
    assert prefix == os.path.join(workdir, "checkpoints", "ckpt-300000")

    loaded, config, step = checkpoints.load(workdir)
    assert (config, step) == (CONFIG, 300000)
    np.testing.assert_array_equal(scores(loaded), scores(ema_net))
    loaded, _, _ = checkpoints.load(prefix, ema=False)
    np.testing.assert_array_equal(scores(loaded), scores(net))
    loaded, config, _ = checkpoints.load(workdir, precision="bf16")
    assert loaded.dtype_policy.name == "mixed_bfloat16" and config.training.precision == "bf16"
    expected = scores(ema_net)
    np.testing.assert_allclose(scores(loaded), expected, atol=0.05 * np.abs(expected).max())

    with pytest.raises(FileExistsError, match="new workdir"):
        checkpoints.save_converted(workdir, CONFIG, net, ema_net, step=1)


def test_training_checkpoint_with_optimizer_loads_for_sampling(tmp_path, nets):
    workdir = str(tmp_path / "run")
    net, ema_net = nets
    optimizer = optimizers.build_optimizer(presets.override(CONFIG, precision="fp16"))
    optimizer.build(net.trainable_variables)
    checkpoints.write_config(workdir, CONFIG)
    checkpoint = checkpoints.make_checkpoint(net, ema_net, tf.Variable(42, dtype=tf.int64),
                                             optimizer=optimizer)
    checkpoints.save(checkpoints.make_manager(workdir, checkpoint), step=42)
    names = {name.split("/")[0] for name, _ in tf.train.list_variables(workdir + "/checkpoints")}
    assert {"net", "ema_net", "step", "optimizer"} <= names

    loaded, _, step = checkpoints.load(workdir)
    assert step == 42
    np.testing.assert_array_equal(scores(loaded), scores(ema_net))


def test_resume_continues_exactly(tmp_path):
    """2 steps, save, restore into a fresh model, 2 more steps == 4 uninterrupted steps: the
    optimizer state, the step (hence the noise draws) and both networks come back."""
    workdir = str(tmp_path / "run")
    data = tf.data.Dataset.from_tensor_slices(images(32)).batch(8)
    config = tiny_config()
    reference = tiny_model(config)
    train(reference, data)

    first = tiny_model(config)
    train(first, data.take(2))
    checkpoint = checkpoints.make_checkpoint(first.net, first.ema_net, first.step,
                                             optimizer=first.optimizer)
    prefix = checkpoints.save(checkpoints.make_manager(workdir, checkpoint), first.step)

    resumed = tiny_model(config, init_seed=7)  # different initial weights, all overwritten
    assert checkpoints.restore(prefix, net=resumed.net, ema_net=resumed.ema_net,
                               step=resumed.step, optimizer=resumed.optimizer)
    assert int(resumed.step.numpy()) == int(resumed.optimizer.iterations.numpy()) == 2
    train(resumed, data.skip(2))
    for a, b in zip(reference.net.weights + reference.ema_net.weights
                    + reference.optimizer.variables,
                    resumed.net.weights + resumed.ema_net.weights + resumed.optimizer.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-8, err_msg=a.path)


def test_rotation_keeps_the_latest_and_every_keep_every(tmp_path, nets):
    workdir = str(tmp_path / "run")
    net, ema_net = nets
    checkpoints.write_config(workdir, CONFIG)
    step = tf.Variable(0, dtype=tf.int64)
    manager = checkpoints.make_manager(
        workdir, checkpoints.make_checkpoint(net, ema_net, step=step), max_to_keep=2)
    for n in range(1, 7):
        step.assign(n)
        checkpoints.save(manager, n, keep_every=3)

    def prefixes(directory):
        return sorted(name[:-len(".index")] for name in os.listdir(directory)
                      if name.endswith(".index"))

    assert prefixes(os.path.join(workdir, "checkpoints")) == ["ckpt-5", "ckpt-6"]
    assert prefixes(os.path.join(workdir, "checkpoints", "kept")) == ["ckpt-3", "ckpt-6"]
    # The EMA weights of every snapshot stay, at a quarter or less of a full checkpoint's size.
    assert prefixes(os.path.join(workdir, "checkpoints", "ema")) == [f"ckpt-{n}" for n in
                                                                      range(1, 7)]
    assert [s for s, _ in checkpoints.checkpoint_prefixes(workdir)] == list(range(1, 7))
    by_step = dict(checkpoints.checkpoint_prefixes(workdir))
    assert "/ema/" in by_step[1] and "/kept/" in by_step[3] and "/ema/" not in by_step[6]
    assert checkpoints.contents(by_step[1]) == {"ema_net", "step"}
    loaded_ema, _, step_1 = checkpoints.load(by_step[1])
    assert step_1 == 1
    with pytest.raises(checkpoints.CheckpointError, match="EMA snapshot"):
        checkpoints.load(by_step[1], ema=False)
    assert manager.latest_checkpoint == os.path.join(workdir, "checkpoints", "ckpt-6")
    loaded, config, step_3 = checkpoints.load(os.path.join(workdir, "checkpoints", "kept",
                                                           "ckpt-3"))
    assert (config, step_3) == (CONFIG, 3)
    np.testing.assert_array_equal(scores(loaded), scores(ema_net))
    # A kept checkpoint is stored once: its files are the rotated ones (hard links), and the
    # copy left after rotation (ckpt-3) is whole.
    directory = os.path.join(workdir, "checkpoints")
    names = [n for n in os.listdir(directory) if n.startswith("ckpt-6.")]
    assert sorted(names) == ["ckpt-6.data-00000-of-00001", "ckpt-6.index"]
    for name in names:
        assert os.path.samefile(os.path.join(directory, name),
                                os.path.join(directory, "kept", name))
    assert os.stat(os.path.join(directory, "kept", "ckpt-3.index")).st_nlink == 1
    checkpoints.verify(os.path.join(directory, "kept", "ckpt-3"))


def test_load_explains_what_is_missing(tmp_path, nets):
    with pytest.raises(FileNotFoundError, match="neither a workdir nor a checkpoint"):
        checkpoints.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        checkpoints.load(str(tmp_path))
    workdir = str(tmp_path / "run")
    checkpoints.write_config(workdir, CONFIG)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        checkpoints.load(workdir)

    # A checkpoint without an EMA network is rejected clearly.
    net, _ = nets
    prefix = os.path.join(workdir, "checkpoints", "ckpt-5")
    tf.train.Checkpoint(net=net.weights, step=tf.Variable(5, dtype=tf.int64)).write(prefix)
    with pytest.raises(ValueError, match="holds no ema_net"):
        checkpoints.load(prefix)
    # A network of another width does not fit the config's.
    checkpoints.write_config(workdir, presets.override(CONFIG, ngf=8))
    with pytest.raises(ValueError, match="`net` does not match the network that .*config.yaml"):
        checkpoints.load(prefix, ema=False)
    # A prefix outside any workdir.
    orphan = str(tmp_path / "orphan" / "ckpt-1")
    tf.train.Checkpoint(net=net.weights).write(orphan)
    with pytest.raises(FileNotFoundError, match="No config.yaml found above"):
        checkpoints.load(orphan)


def _size(prefix):
    return sum(os.path.getsize(p) for p in tf.io.gfile.glob(prefix + ".*"))


def test_restore_without_optimizer_state_and_clear_errors(tmp_path):
    """A converted checkpoint (no optimizer) restores weights and step and leaves Adam fresh;
    unreadable, foreign or mismatched checkpoints give one short paragraph naming the file."""
    config = tiny_config()
    source = tiny_model(config)
    train(source, tf.data.Dataset.from_tensor_slices(images(16)).batch(8))
    workdir = str(tmp_path / "converted")
    prefix = checkpoints.save_converted(workdir, config, source.net, source.ema_net, step=1234)

    target = tiny_model(config, init_seed=5)
    assert not checkpoints.restore(prefix, net=target.net, ema_net=target.ema_net,
                                   step=target.step, optimizer=target.optimizer)
    assert int(target.step.numpy()) == 1234 and int(target.optimizer.iterations.numpy()) == 0
    assert all(np.all(v.numpy() == 0) for v in target.optimizer.variables
               if len(v.shape) and "momentum" in v.path)
    for a, b in zip(source.net.weights + source.ema_net.weights,
                    target.net.weights + target.ema_net.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # A full training checkpoint is about four weight copies (live, EMA, two Adam moments);
    # its EMA snapshot one.
    full = checkpoints.make_checkpoint(target.net, target.ema_net, target.step,
                                       optimizer=target.optimizer)
    full_prefix = checkpoints.save(checkpoints.make_manager(str(tmp_path / "full"), full), 7)
    ema_prefix = os.path.join(str(tmp_path / "full"), "checkpoints", "ema", "ckpt-7")
    assert 0.2 < _size(ema_prefix) / _size(full_prefix) < 0.3

    truncated = str(tmp_path / "truncated" / "ckpt-1")
    tf.io.gfile.makedirs(os.path.dirname(truncated))
    for path in tf.io.gfile.glob(prefix + ".*"):
        with open(path, "rb") as f:
            content = f.read()
        with open(truncated + path[len(prefix):], "wb") as f:
            f.write(content[:len(content) // 2])
    foreign = str(tmp_path / "foreign" / "ckpt-1")
    tf.train.Checkpoint(model=tf.Variable([1.0, 2.0])).write(foreign)
    real = presets.override(presets.get("digits"), ngf=4, num_scales=4)
    narrow = checkpoints.save_converted(str(tmp_path / "narrow"), real, models.build(real),
                                        models.build(real), step=1)
    wider = ScoreModel(presets.override(real, ngf=8))
    wider.compile()
    for path, match in ((truncated, "Cannot read the checkpoint .*truncated"),
                        (foreign, "holds no ema_net, net, step: it is not a full ncsn_tf"),
                        (str(tmp_path / "missing" / "ckpt-3"), "Cannot read the checkpoint"),
                        (narrow, "does not fit this model")):
        model = wider if path == narrow else target
        with pytest.raises(checkpoints.CheckpointError, match=match) as error:
            checkpoints.restore(path, net=model.net, ema_net=model.ema_net, step=model.step,
                                optimizer=model.optimizer)
        assert path in str(error.value) and len(str(error.value)) < 900
        assert "\n" not in str(error.value)
