"""Official checkpoints/configs → ncsn_tf: parity with the official PyTorch outputs.

Fixtures (tests/fixtures/ncsnv2_reference/README.md) were produced by the official code. Tests
that read .pth files need the optional torch dependency and are skipped without it; the
network parity itself is also checked without torch from the NumPy copy of the live weights.
"""
import argparse
import pathlib
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import yaml
from absl import flags

from ncsn_tf import convert, models
from ncsn_tf.training import checkpoints
from ncsn_tf.config import presets

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "ncsnv2_reference"
CASES = {"ncsnv2_32": "ncsnv2", "ncsnv2_28": "ncsnv2", "ncsnv2deeper_64": "ncsnv2_deeper",
         "ncsnv2deepest_64": "ncsnv2_deepest"}
TORCH_REASON = "reading official .pth checkpoints needs the optional torch extra"


def _paths(case):
    return str(FIXTURES / f"{case}.pth"), str(FIXTURES / f"{case}.yml")


def _reference(case):
    return np.load(FIXTURES / f"{case}.npz")


def _nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def _assert_matches(net, ref, key):
    out = net(_nhwc(ref["x_nchw"]), ref["labels"]).numpy()
    expected = _nhwc(ref[key])
    assert np.abs(out - expected).max() / np.abs(expected).max() <= 1e-4


def _num_params(net):
    return sum(int(np.prod(w.shape)) for w in net.trainable_weights)


# ----------------------------------------------------------------------------- without torch

@pytest.mark.parametrize("case", CASES)
def test_networks_match_official_outputs(case):
    """Official live weights (NumPy copy) in our networks give the official scores."""
    weights = dict(np.load(FIXTURES / f"{case}_live_weights.npz"))
    assert convert.official_arch(weights) == CASES[case]
    config = convert.read_official_config(_paths(case)[1])
    config.model.arch = CASES[case]
    net = models.build(config)
    convert.assign_official_weights(net, weights)
    ref = _reference(case)
    assert _num_params(net) == int(ref["num_params"])
    np.testing.assert_allclose(net.sigmas.numpy(), ref["sigmas"], rtol=1e-6)
    _assert_matches(net, ref, "scores_nchw")
    # The continuous-σ score at the table's values gives the official scores too.
    out = net.score(_nhwc(ref["x_nchw"]), ref["sigmas"][ref["labels"]]).numpy()
    expected = _nhwc(ref["scores_nchw"])
    assert np.abs(out - expected).max() / np.abs(expected).max() <= 1e-4


def test_read_plain_official_config():
    config = convert.read_official_config(_paths("ncsnv2_32")[1])
    expected = presets.override(
        presets.get("cifar10"), arch="ncsnv2", image_size=32, channels=3, random_flip=True,
        uniform_dequantization=False, num_scales=10, sigma_begin=1.0, sigma_end=0.01,
        sigma_dist="geometric", ngf=8, ema_rate=0.999, lr=1e-4, beta1=0.9, adam_eps=1e-8,
        weight_decay=0.0, batch_size=128, n_iters=300001, snapshot_freq=5000,
        snapshot_sampling=True, anneal_power=2.0, sampling_batch_size=100, n_steps_each=5,
        step_lr=6.2e-6, denoise=True, data_init=False)
    assert config == expected
    assert isinstance(config.model.sigma_begin, float)


def _official_tree(**changes):
    with open(_paths("ncsnv2_32")[1]) as f:
        tree = yaml.safe_load(f)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        tree[section][key] = value
    return tree


def _as_namespace(tree):
    return argparse.Namespace(**{k: _as_namespace(v) if isinstance(v, dict) else v
                                 for k, v in tree.items()})


def test_read_trainer_config_yml_with_namespace_tags(tmp_path):
    """The official trainer's config.yml is yaml.dump(argparse.Namespace(...))."""
    tree = _official_tree(**{"data.dataset": "LSUN", "data.image_size": 64, "model.ngf": 16})
    tree["data"]["category"] = "church_outdoor"
    path = tmp_path / "config.yml"
    path.write_text(yaml.dump(_as_namespace(tree), default_flow_style=False))
    assert "!!python/object:argparse.Namespace" in path.read_text()
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(path.read_text())
    config = convert.read_official_config(str(path))
    assert config.name == "lsun_church_outdoor"
    assert config.data.dataset == "lsun/church_outdoor"
    assert config.model.arch == "ncsnv2_deeper"  # LSUN is NCSNv2Deeper in the official runner
    assert (config.data.image_size, config.model.ngf, config.model.num_scales) == (64, 16, 10)
    church = presets.get("lsun_church_outdoor")
    assert config.training.keep_every == church.training.keep_every


@pytest.mark.parametrize("payload", [
    '!!python/object/apply:os.system ["touch {marker}"]',
    'data: !!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
    'model: !!python/name:os.system ""',
])
def test_malicious_config_tags_are_rejected(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "config.yml"
    path.write_text(payload.format(marker=marker))
    with pytest.raises(ValueError, match="unsupported YAML tag"):
        convert.read_official_config(str(path))
    assert not marker.exists()


def test_unsupported_official_options(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(_official_tree(**{"data.logit_transform": True})))
    with pytest.raises(ValueError, match="logit_transform"):
        convert.read_official_config(str(path))
    tree = _official_tree()
    del tree["model"]["ngf"]
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match="model.ngf"):
        convert.read_official_config(str(path))
    path.write_text(yaml.safe_dump(_official_tree(**{"data.dataset": "LSUN"})))
    with pytest.raises(ValueError, match="data.category"):
        convert.read_official_config(str(path))


def test_assign_names_every_problem_and_assigns_nothing():
    weights = dict(np.load(FIXTURES / "ncsnv2_28_live_weights.npz"))
    config = convert.read_official_config(_paths("ncsnv2_28")[1])
    net = models.build(config)
    before = [w.numpy() for w in net.weights]
    del weights["res2.0.shortcut.conv.bias"]
    weights["res9.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    weights["end_conv.weight"] = np.zeros((3, 8, 3, 3), np.float32)  # 1 channel in the model
    with pytest.raises(ValueError) as error:
        convert.assign_official_weights(net, weights)
    message = str(error.value)
    assert "missing keys: res2.0.shortcut.conv.bias" in message
    assert "unexpected keys: res9.0.conv1.weight" in message
    assert "end_conv.weight" in message and "shape" in message
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, net.weights))


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        convert.read_official_checkpoint(_paths("ncsnv2_32")[0])


# ----------------------------------------------------------------------------- with torch

@pytest.mark.parametrize("case", CASES)
def test_load_official_checkpoint_matches_official_outputs(case):
    """EMA weights by default (the live ones: the tests without torch, the CLI and no-EMA)."""
    pytest.importorskip("torch", reason=TORCH_REASON)
    ref = _reference(case)
    net, config = convert.load_official_checkpoint(*_paths(case))
    assert config.model.arch == CASES[case] == models.arch_name(config)
    assert _num_params(net) == int(ref["num_params"])
    np.testing.assert_allclose(net.sigmas.numpy(), ref["sigmas"], rtol=1e-6)
    _assert_matches(net, ref, "scores_ema_nchw")


def test_legacy_serialization_and_step(tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    pth, _ = _paths("ncsnv2_28")
    states = torch.load(pth, map_location="cpu", weights_only=True)
    legacy = tmp_path / "legacy.pth"
    torch.save(states, legacy, _use_new_zipfile_serialization=False)  # PyTorch ≤1.5 format
    assert legacy.read_bytes()[:2] != b"PK"
    ckpt = convert.read_official_checkpoint(str(legacy))
    assert ckpt.step == states[3] == convert.read_official_step(pth)
    assert ckpt.epoch == states[2]
    assert set(ckpt.state) == {k.removeprefix("module.") for k in states[0]}
    np.testing.assert_array_equal(ckpt.ema["begin_conv.weight"],
                                  states[4]["begin_conv.weight"].numpy())


def test_checkpoint_without_ema_and_untrusted_pickles(tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    pth, yml = _paths("ncsnv2_28")
    states = torch.load(pth, map_location="cpu", weights_only=True)
    no_ema = tmp_path / "no_ema.pth"
    torch.save(states[:4], no_ema)
    with pytest.raises(ValueError, match="no_ema"):
        convert.load_official_checkpoint(str(no_ema), yml)
    net, _ = convert.load_official_checkpoint(str(no_ema), yml, ema=False)
    _assert_matches(net, _reference("ncsnv2_28"), "scores_nchw")
    untrusted = tmp_path / "untrusted.pth"
    torch.save(states[:4] + [argparse.Namespace(a=1)], untrusted)  # not a plain container
    with pytest.raises(ValueError, match="weights_only"):
        convert.read_official_checkpoint(str(untrusted))
    with pytest.raises(ValueError, match="official training checkpoint"):
        torch.save(states[0], tmp_path / "bare.pth")
        convert.read_official_checkpoint(str(tmp_path / "bare.pth"))


def _run_cli(*args):
    flag_values = flags.FlagValues()
    convert.define_flags(flag_values)
    convert.main(flag_values(["convert", *args]), flag_values)


def _restore_workdir(workdir):
    """What training/sampling do: a fresh `build(config)` restored with tf.train.Checkpoint."""
    config = checkpoints.read_config(str(workdir))
    net, ema_net = models.build(config), models.build(config)
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = checkpoints.make_checkpoint(net, ema_net, step=step)
    checkpoint.restore(tf.train.latest_checkpoint(str(workdir / "checkpoints"))).assert_consumed()
    return config, net, ema_net, int(step.numpy())


def test_cli_writes_a_workdir_that_restores(tmp_path):
    pytest.importorskip("torch", reason=TORCH_REASON)
    pth, yml = _paths("ncsnv2_28")
    ref = _reference("ncsnv2_28")
    _run_cli(f"--checkpoint={pth}", f"--config={yml}", f"--workdir={tmp_path / 'ema'}")
    config, net, ema_net, step = _restore_workdir(tmp_path / "ema")
    assert (config.model.arch, config.data.image_size, config.data.channels, config.model.ngf,
            config.model.num_scales, config.model.sigma_begin) == ("ncsnv2", 28, 1, 8, 10, 1.0)
    assert step == 1000  # the fixture was saved at step 1000
    _assert_matches(net, ref, "scores_nchw")
    _assert_matches(ema_net, ref, "scores_ema_nchw")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        convert.convert(pth, yml, str(tmp_path / "ema"))

    _run_cli(f"--checkpoint={pth}", f"--config={yml}", f"--workdir={tmp_path / 'live'}",
             "--no_ema")
    _, _, ema_net, _ = _restore_workdir(tmp_path / "live")
    _assert_matches(ema_net, ref, "scores_nchw")
    # The old spellings still work for one release, with a warning.
    with mock.patch.object(convert.logging, "warning") as warning:
        _run_cli(f"--checkpoint={pth}", f"--config={yml}", f"--output={tmp_path / 'old'}",
                 "--no-ema")
    assert [call.args[1:] for call in warning.call_args_list] == [
        ("output", "workdir"), ("no-ema", "no_ema")]
    _, _, ema_net, _ = _restore_workdir(tmp_path / "old")
    _assert_matches(ema_net, ref, "scores_nchw")


def _broken_checkpoints(tmp_path, torch):
    """name -> (path, expected message) of official-looking files that are not usable."""
    pth, _ = _paths("ncsnv2_28")
    states = torch.load(pth, map_location="cpu", weights_only=True)
    raw = pathlib.Path(pth).read_bytes()
    cases = {}

    def save(name, value):
        torch.save(value, tmp_path / f"{name}.pth")
        return str(tmp_path / f"{name}.pth")

    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(3000))
    cases["random bytes"] = (str(tmp_path / "random.pth"), "not a PyTorch checkpoint")
    (tmp_path / "cut.pth").write_bytes(raw[:len(raw) // 2])
    cases["truncated"] = (str(tmp_path / "cut.pth"), "truncated or corrupt")
    cases["missing"] = (str(tmp_path / "none.pth"), "no such file")
    cases["text step"] = (save("step", states[:3] + ["abc"] + states[4:]), "are not integers")
    extra = {**states[0], "note": 3}
    cases["non-tensor"] = (save("extra", [extra] + states[1:]), "non-tensor values (note)")
    no_sigmas = {k: v for k, v in states[0].items() if "sigmas" not in k}
    cases["no sigmas"] = (save("nosig", [no_sigmas] + states[1:]), "lacks the `sigmas`")
    nan = dict(states[0])
    first = next(k for k in nan if k.endswith("begin_conv.weight"))
    nan[first] = nan[first] * float("nan")
    cases["NaN weights"] = (save("nan", [nan] + states[1:]), "NaN or Inf values (begin_conv")
    return cases


def test_unusable_checkpoints_are_one_paragraph_errors(tmp_path):
    """The CLI exits with one line naming the file and the problem, and writes nothing."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    _, yml = _paths("ncsnv2_28")
    for name, (path, message) in _broken_checkpoints(tmp_path, torch).items():
        with pytest.raises(SystemExit, match="^convert: ") as error:
            _run_cli(f"--checkpoint={path}", f"--config={yml}", f"--workdir={tmp_path / 'out'}")
        assert message in str(error.value), (name, str(error.value))
        assert "could run code" not in str(error.value), name
        assert not (tmp_path / "out").exists(), name


@pytest.mark.parametrize("key, value, message", [
    ("training.snapshot_sampling", "false", None),  # a string 'false' stays False
    ("training.snapshot_sampling", "no", None),
    ("training.snapshot_sampling", "maybe", "is not a valid bool"),
    ("model.ngf", 8.9, "is not a valid int"),
    ("model.ngf", "eight", "is not a valid int"),
    ("model.sigma_begin", float("nan"), "is not a valid float"),
])
def test_official_settings_keep_their_meaning(key, value, message):
    tree = _official_tree(**{key: value})
    if message is None:
        assert convert.official_to_config(tree).training.snapshot_sampling is False
    else:
        with pytest.raises(ValueError, match=message):
            convert.official_to_config(tree)
    assert convert.official_to_config(_official_tree(**{"model.ngf": 8.0})).model.ngf == 8
