"""`python -m ncsn_tf.configure`: flags → noise scales, in-process with its own flag values."""
import json
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf
from absl import app
from absl import flags as absl_flags
from scipy.spatial.distance import pdist

import ncsn_tf
from ncsn_tf import configure, noise
from ncsn_tf.config import presets


def _run(*argv):
    fv = absl_flags.FlagValues()
    configure.define_flags(fv)
    fv(["configure", *argv])
    return configure.run(fv)


def test_json_for_a_given_dimension_and_sigma_begin():
    report = json.loads(_run("--dim=3072", "--sigma_begin=50", "--json"))
    rec = noise.recommend(3072, 50.0, 0.01, 5)
    assert report["num_scales"] == 220 and report["gamma"] == pytest.approx(1.0398, abs=1e-4)
    for field in ("sigma_begin", "sigma_end", "gamma", "num_scales", "sigma_ratio",
                  "n_steps_each", "step_lr", "variance_ratio"):
        assert report[field] == getattr(rec, field), field
    assert report["sigma_begin_source"] == "given" and report["shape"] is None


def test_num_scales_of_ones_own_gives_the_step_size_for_that_table():
    """CIFAR-10's official L = 232 (Technique 2 alone gives 220): ε for that table's ratio is
    the paper's 6.2e-6, and the variance ratio it reaches is reported."""
    report = json.loads(_run("--dim=3072", "--sigma_begin=50", "--num_scales=232", "--json"))
    ratio = (50 / 0.01) ** (1 / 231)
    assert report["num_scales"] == 232 and report["technique2_num_scales"] == 220
    assert report["sigma_ratio"] == pytest.approx(ratio, rel=1e-12)
    assert report["step_lr"] == pytest.approx(6.2e-6, rel=0.01)
    assert report["step_lr"] == noise.best_step_lr(5, ratio, 0.01)
    assert report["variance_ratio"] == pytest.approx(
        noise.variance_ratio(report["step_lr"], 5, ratio, 0.01))
    table = _run("--dim=3072", "--sigma_begin=50", "--num_scales=232")
    assert "given (--num_scales)" in table and "Technique 2 gives 220" in table
    assert "--num_scales=232" in table and "variance ratio 1.05" in table
    with pytest.raises(absl_flags.IllegalFlagValueError):
        _run("--dim=3072", "--sigma_begin=50", "--num_scales=1")


def test_image_size_and_channels_give_the_dimension_and_options_are_honoured():
    report = json.loads(_run("--image_size=28", "--channels=1", "--sigma_begin=28",
                             "--sigma_end=0.02", "--n_steps_each=3", "--json"))
    assert report["dim"] == 784 and report["shape"] == [28, 28, 1]
    rec = noise.recommend(784, 28.0, 0.02, 3)
    assert (report["num_scales"], report["step_lr"]) == (rec.num_scales, rec.step_lr)


def test_table_says_where_sigma_begin_came_from_and_prints_training_flags():
    table = _run("--dim=784", "--sigma_begin=28")
    assert "given (--sigma_begin)" in table
    rows = {line.split()[0]: line.split()[2] for line in table.splitlines()[1:7]}
    assert set(rows) == {"sigma_begin", "sigma_end", "gamma", "num_scales", "n_steps_each",
                         "step_lr"}
    flag_line = table.splitlines()[-1]
    train_flags = dict(re.findall(r"--(\w+)=(\S+)", flag_line))
    rec = noise.recommend(784, 28.0)
    assert int(train_flags["num_scales"]) == rec.num_scales == int(rows["num_scales"])
    assert float(train_flags["step_lr"]) == pytest.approx(rec.step_lr, rel=1e-2)
    assert float(train_flags["sigma_begin"]) == 28.0


@pytest.mark.parametrize("argv, match", [
    ([], "Nothing to configure"),
    (["--dim=784"], "--sigma_begin is required"),
    (["--dim=784", "--image_size=28", "--sigma_begin=1"], "either as --dim or"),
    (["--image_size=28", "--sigma_begin=1"], "--image_size and --channels go together"),
    (["--dataset=digits", "--preset=digits", "--channels=2"], "--channels=2 must be one of 1, 3"),
    (["--dim=784", "--sigma_begin=1", "--exact"], "--exact applies only with --dataset"),
    (["--dim=784", "--sigma_begin=1", "--preset=mnist", "--max_examples=10"],
     "--preset, --max_examples apply only with --dataset"),
    (["--dataset=digits", "--dim=256"], "--dim cannot be combined with --dataset"),
    (["--dataset=digits", "--sigma_begin=9"], "--sigma_begin cannot be combined"),
    (["--dataset=digits", "--exact", "--max_examples=10"], "drop --max_examples"),
    (["--dataset=folder:/nowhere"], "Cannot choose a preset"),
    (["--dim=4", "--sigma_begin=1"], "D >= 5"),
    (["--dim=784", "--sigma_begin=0.001"], "sigma_begin > sigma_end"),
])
def test_bad_flag_combinations_are_usage_errors(argv, match):
    with pytest.raises(app.UsageError, match=re.escape(match)):
        _run(*argv)


@pytest.fixture
def fake_data(monkeypatch):
    """Stands in for `ncsn_tf.data`: random images of the config's shape, calls recorded."""
    calls, images = [], {}

    def load(config, split="train", *, training=True, **kwargs):
        calls.append((config, split, training))
        shape = (37, config.data.image_size, config.data.image_size, config.data.channels)
        images["train"] = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
        return tf.data.Dataset.from_tensor_slices(images["train"])

    module = types.ModuleType("ncsn_tf.data")
    module.load = load
    monkeypatch.setitem(sys.modules, "ncsn_tf.data", module)
    monkeypatch.setattr(ncsn_tf, "data", module, raising=False)
    return calls, images


def test_dataset_mode_measures_sigma_begin_on_the_training_images(fake_data):
    calls, images = fake_data
    report = json.loads(_run("--dataset=folder:/photos", "--image_size=16", "--channels=3",
                             "--block_size=8", "--json"))
    (config, split, training), = calls
    assert (split, training) == ("train", False)
    assert (config.data.dataset, config.data.image_size, config.data.channels) == (
        "folder:/photos", 16, 3)
    assert report["sigma_begin"] == pytest.approx(
        pdist(images["train"].reshape(37, -1)).max(), rel=1e-6)
    assert (report["sigma_begin_source"], report["num_examples"], report["dim"]) == (
        "exact", 37, 768)
    # The preset picked for 16 px (digits) supplies σL and T.
    rec = noise.recommend(768, report["sigma_begin"], presets.get("digits").model.sigma_end,
                          presets.get("digits").sampling.n_steps_each)
    assert (report["num_scales"], report["step_lr"]) == (rec.num_scales, rec.step_lr)


def test_dataset_mode_reports_a_subsample(fake_data):
    table = _run("--dataset=mnist", "--max_examples=10", "--data_dir=/tfds")
    config = fake_data[0][0][0]
    assert (config.name, config.data.data_dir) == ("mnist", "/tfds")
    assert "mnist: max pairwise distance, uniform random subsample of 10 of 37 examples" in table


def test_unusable_data_is_a_one_line_error(monkeypatch):
    def load(config, split="train", **kwargs):
        raise ValueError(f"No files match {config.data.dataset}")

    module = types.ModuleType("ncsn_tf.data")
    module.load = load
    monkeypatch.setitem(sys.modules, "ncsn_tf.data", module)
    monkeypatch.setattr(ncsn_tf, "data", module, raising=False)
    with pytest.raises(app.UsageError, match="No files match tfrecord:/none/"):
        _run("--dataset=tfrecord:/none/*.tfrecord", "--preset=cifar10")


def test_digits_end_to_end():
    report = json.loads(_run("--dataset=digits", "--json"))
    assert report["sigma_begin_source"] == "exact" and report["dim"] == 256
    # The training split is part of the 1,797 digits the `digits` preset's σ1 bounds.
    assert 8.0 < report["sigma_begin"] <= presets.get("digits").model.sigma_begin
    assert report["num_scales"] == noise.num_scales_for(
        report["sigma_begin"], 0.01, noise.gamma_for_dimension(256))


def test_main_prints_the_report_or_a_one_line_error(capsys):
    fv = absl_flags.FlagValues()
    configure.define_flags(fv)
    fv(["configure", "--dim=256"])
    with pytest.raises(SystemExit, match="^configure: --sigma_begin is required"):
        configure.main(["configure"], fv)
    with pytest.raises(SystemExit, match="Unexpected arguments: extra"):
        configure.main(["configure", "extra"], fv)
    fv.sigma_begin = 8.6
    configure.main(["configure"], fv)
    assert capsys.readouterr().out.startswith("Noise scales for D = 256")


def test_command_line_entry_point():
    done = subprocess.run([sys.executable, "-m", "ncsn_tf.configure", "--dim=256",
                           "--sigma_begin=8.6", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_scales"] == presets.get("digits").model.num_scales
