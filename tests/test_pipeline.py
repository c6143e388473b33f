"""pipelines: the KFP v2 pipeline run locally end to end (push, cache, failed blessing, failed
component), its compiled spec, and the pieces the components are made of.

The end-to-end runs use the digits preset with a 4-filter network, a few training steps and
the random test feature network (not Inception), so their FIDs mean nothing; they check the
plumbing: what gets pushed, when, and that a cached re-run does no work.
"""
import glob
import io
import json
import math
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import yaml
from absl import flags
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from scipy import optimize, special

from ncsn_tf import data, noise
from ncsn_tf.config import presets
from pipelines import evaluator, example_gen, pipeline, pusher, run, statistics_gen, trainer
from pipelines.pusher import PushedModel

MODEL_NAME = "tiny"
TRAINING = dict(config_overrides={
    "n_iters": 3, "batch_size": 16, "ngf": 4, "n_steps_each": 1, "snapshot_freq": 3,
    "snapshot_sampling": False, "test_freq": 0, "log_freq": 1, "sampling_batch_size": 8})
ARGUMENTS = dict(dataset="digits", max_train_examples=200, max_eval_examples=40,
                 feature_network="random-test", num_eval_samples=8, model_name=MODEL_NAME,
                 **TRAINING)


def _task_dirs(pipeline_root, task):
    return sorted(glob.glob(os.path.join(pipeline_root, f"{pipeline.PIPELINE_NAME}-*", task)))


def _versions(serving_base):
    model_dir = os.path.join(serving_base, MODEL_NAME)
    return sorted(int(v) for v in os.listdir(model_dir) if v.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three local runs sharing one cache and one serving base: the pipeline, the same again,
    and the same with an FID threshold no model can meet."""
    root = str(tmp_path_factory.mktemp("pipeline_root"))
    serving_base = str(tmp_path_factory.mktemp("saved_models"))
    arguments = dict(ARGUMENTS, serving_base=serving_base)
    out = {"root": root, "serving_base": serving_base}
    for name, extra in (("first", {}), ("again", {}), ("strict", {"fid_threshold": 1e-9})):
        start = time.perf_counter()
        console = io.StringIO()
        out[name] = run.run_local(dict(arguments, **extra), root, console=console)
        out[name + "_seconds"] = time.perf_counter() - start
        out[name + "_console"] = console.getvalue()
        out[name + "_versions"] = _versions(serving_base)
    return out


def test_end_to_end_pushes_a_servable_model(runs):
    first = runs["first"]
    assert first["blessed"] and first["pushed"], first
    assert first["version"] == 1
    assert first["path"] == os.path.join(runs["serving_base"], MODEL_NAME, "1")
    assert "random-test-network" in first["network"] and "NOT Inception" in first["network"]
    assert math.isfinite(first["fid"]) and first["fid"] > 0
    signature = tf.saved_model.load(first["path"]).signatures["serving_default"]
    outputs = signature(seed=tf.constant([1, 2, 1], tf.int64))
    images = outputs["images"].numpy()
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], images[2])  # one image per seed
    decoded = tf.io.decode_png(outputs["png_bytes"][1]).numpy()
    np.testing.assert_array_equal(decoded, images[1])
    # The evaluation is stored in the version (the next run's baseline) and says which network.
    pushed = pusher.latest(runs["serving_base"], MODEL_NAME)
    assert pushed.version == 1 and pushed.evaluation["fid"] == first["fid"]
    assert pushed.evaluation["num_samples"] == ARGUMENTS["num_eval_samples"]
    assert pushed.evaluation["reference"] == {"split": "eval", "num_images": 40,
                                              "source": "digits"}


def test_console_shows_one_line_per_component_and_the_log_file_the_rest(runs):
    header, *lines = runs["first_console"].splitlines()
    log_path = header.rsplit(" ", 1)[1]
    assert os.path.dirname(log_path) == runs["root"]
    names = ("ExampleGen", "StatisticsGen", "Trainer", "Evaluator", "Pusher")
    assert [line.split()[:2] for line in lines] == [[name, "done"] for name in names], lines
    assert "ExampleGen: 200 train and 40 held-out images of 16x16x1" in lines[0]
    assert "sigma_begin" in lines[1] and "trained" in lines[2]
    assert f"FID {runs['first']['fid']:.6g}" in lines[3] and "pushed version 1" in lines[4]
    with open(log_path, encoding="utf-8") as f:
        log = f.read()
    # The executor's detail (and TensorFlow's) is in the log, without colour codes.
    assert "Executing task" in log and "Training digits" in log and "\x1b[" not in log
    # A re-run served from the cache says so, without the detail.
    again = runs["again_console"].splitlines()[1:]
    assert [line.split()[:2] for line in again] == [[name, "cached"] for name in names], again


def test_rerun_is_served_from_the_cache(runs):
    again = runs["again"]
    assert again == runs["first"]  # same outputs (those of the first run)
    assert runs["again_versions"] == [1]  # nothing pushed twice
    for task in ("example-gen", "statistics-gen", "trainer"):  # ran once in all three runs
        assert len(_task_dirs(runs["root"], task)) == 1, task
    # The first run spends most of its time starting TensorFlow in five subprocesses and
    # training; the cached one starts none.
    assert runs["again_seconds"] < 0.25 * runs["first_seconds"], runs


def test_failed_blessing_pushes_nothing(runs):
    strict = runs["strict"]
    assert strict["fid"] == runs["first"]["fid"]  # same model, same seeds: same samples
    assert not strict["blessed"] and not strict["pushed"]
    assert strict["version"] is None and strict["path"] is None
    assert runs["strict_versions"] == [1]
    reasons = " | ".join(strict["reasons"])
    assert "> threshold 1e-09" in reasons
    assert "of pushed version 1" in reasons  # compared with the baseline too (and no worse)
    assert len(_task_dirs(runs["root"], "evaluator")) == 2  # re-evaluated for the new threshold
    assert len(_task_dirs(runs["root"], "pusher")) == 2


def test_examples_read_back_exactly_as_the_source(runs):
    (examples_dir,) = _task_dirs(runs["root"], "example-gen")
    examples_dir = os.path.join(examples_dir, "examples")
    config = example_gen.read_config(examples_dir)
    source = presets.get("digits")
    for split, limit in (("train", 200), ("test", 40)):
        written = np.concatenate(list(data.load(config, split, training=False, batch_size=100)
                                      .as_numpy_iterator()))
        expected = np.concatenate(list(data.load(source, split, training=False, batch_size=100)
                                       .take(1 if split == "test" else 2)
                                       .as_numpy_iterator()))[:limit]
        np.testing.assert_array_equal(written, np.round(expected * 255.0) / 255.0)


def test_statistics_match_numpy(runs):
    (statistics_dir,) = _task_dirs(runs["root"], "statistics-gen")
    stats = statistics_gen.read(os.path.join(statistics_dir, "statistics"))
    images = np.round(np.concatenate(list(
        data.load(presets.get("digits"), "train", training=False, batch_size=200)
        .take(1).as_numpy_iterator())) * 255.0) / 255.0
    flat = images.reshape(len(images), -1).astype(np.float64)
    distances = np.sqrt(np.maximum(((flat[:, None] - flat[None]) ** 2).sum(-1), 0.0))
    assert stats["num_examples"] == 200 and stats["shape"] == [16, 16, 1]
    assert stats["dim"] == 256 and stats["sigma_begin_exact"]
    assert stats["sigma_begin"] == pytest.approx(distances.max(), rel=1e-5)
    assert stats["channel_mean"][0] == pytest.approx(flat.mean(), rel=1e-6)
    assert stats["channel_std"][0] == pytest.approx(flat.std(), rel=1e-5)
    mean_png = tf.io.decode_png(tf.io.read_file(
        os.path.join(statistics_dir, "statistics", statistics_gen.MEAN_IMAGE_FILE))).numpy()
    assert mean_png.shape == (64, 64, 1)  # 16 px shown 4x, as the sample grids
    np.testing.assert_array_equal(mean_png[::4, ::4], np.round(images.mean(axis=0) * 255.0))


def test_failed_component_is_named_with_its_error(tmp_path):
    with pytest.raises(run.PipelineFailed) as failure:
        run.run_local(dict(ARGUMENTS, preset="no_such_preset",
                           serving_base=str(tmp_path / "saved_models")),
                      str(tmp_path / "root"))
    assert failure.value.component == "ExampleGen"
    assert failure.value.reason.startswith("ValueError: Unknown preset 'no_such_preset'. "
                                           "Available presets: ")
    assert not os.path.exists(tmp_path / "saved_models")


# --- the compiled spec ------------------------------------------------------------------------

def test_compiled_spec_is_a_valid_pipeline_spec_with_the_image_as_a_parameter(tmp_path):
    from kfp import compiler, components

    path = str(tmp_path / "pipeline.yaml")
    pipeline.compile_pipeline(path, image="registry.example/ncsn-tf:7", dataset="cifar10")
    with open(path) as f:
        spec_dict = yaml.safe_load(f)
    spec = json_format.ParseDict(spec_dict, pipeline_spec_pb2.PipelineSpec())  # strict schema
    tasks = {"example-gen", "statistics-gen", "trainer", "evaluator", "pusher"}
    assert set(spec.components) == {f"comp-{t}" for t in tasks}
    assert set(spec.root.dag.tasks) == tasks
    parameters = spec.root.input_definitions.parameters
    assert parameters["image"].default_value.string_value == "registry.example/ncsn-tf:7"
    assert parameters["dataset"].default_value.string_value == "cifar10"
    executors = spec_dict["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{t}" for t in tasks}
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}", name
        assert "kfp.dsl.executor_main" in " ".join(container["command"]), name
    for name, task in spec.root.dag.tasks.items():
        assert (task.inputs.parameters["pipelinechannel--image"].component_input_parameter
                == "image"), name
    assert list(spec.root.dag.tasks["pusher"].dependent_tasks) == ["evaluator", "trainer"]
    # Loading the file as a component and compiling it again gives the same spec.
    compiler.Compiler().compile(components.load_component_from_file(path),
                                str(tmp_path / "again.yaml"))
    with open(tmp_path / "again.yaml") as f:
        assert yaml.safe_load(f) == spec_dict


# --- the pieces -------------------------------------------------------------------------------

def _flag_values(*argv):
    fv = flags.FlagValues()
    run.define_flags(fv)
    fv(["pipelines.run", *argv])
    return fv


def test_flags_become_pipeline_parameters(tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("data: {image_size: 64, random_flip: false}\n"
                           "model: {ngf: 32, ema_rate: 0.99}\n")
    fv = _flag_values("--dataset=folder:/data/faces", f"--config={config_file}",
                      "--preset=celeb_a", "--ngf=8", "--n_iters=100", "--num_scales=20",
                      "--nouse_proposed_noise", "--fid_threshold=30", "--image=img:1",
                      "--serving_base=/srv/models")
    assert run.pipeline_arguments(fv) == {
        "dataset": "folder:/data/faces", "image_size": 64,
        "config_overrides": {"random_flip": False, "ngf": 8, "ema_rate": 0.99, "n_iters": 100,
                             "num_scales": 20},
        "preset": "celeb_a", "image": "img:1", "serving_base": "/srv/models",
        "fid_threshold": 30.0, "use_proposed_noise": False}
    assert run.pipeline_arguments(_flag_values()) == {}  # the pipeline's defaults stand


def _gamma(dim):
    """Technique 2 written out: Φ(√(2D)(γ−1) + 3γ) − Φ(√(2D)(γ−1) − 3γ) = 1/2."""
    r = math.sqrt(2 * dim)
    return optimize.brentq(lambda g: special.ndtr(r * (g - 1) + 3 * g)
                           - special.ndtr(r * (g - 1) - 3 * g) - 0.5, 1.0 + 1e-9, 2.0,
                           xtol=1e-14)


@pytest.fixture()
def artifacts(tmp_path):
    """A hand-made Examples directory (digits preset) and statistics (D = 256, σ1 = 9)."""
    examples_dir, statistics_dir = tmp_path / "examples", tmp_path / "statistics"
    examples_dir.mkdir()
    statistics_dir.mkdir()
    (examples_dir / example_gen.CONFIG_FILE).write_text(yaml.safe_dump(
        presets.get("digits").to_dict()))
    (statistics_dir / statistics_gen.STATISTICS_FILE).write_text(json.dumps(
        {"sigma_begin": 9.0, "dim": 256}))
    return str(examples_dir), str(statistics_dir)


def test_training_config_uses_the_proposal_unless_overridden(artifacts):
    preset = presets.get("digits")
    sigma_end = preset.model.sigma_end
    config, sources = trainer.training_config(*artifacts, {"n_iters": 5})
    assert config.data.dataset == example_gen.dataset_spec(artifacts[0])
    assert config.training.n_iters == 5 and config.model.ngf == preset.model.ngf
    assert config.model.sigma_begin == 9.0
    assert config.model.num_scales == math.ceil(1 + math.log(9.0 / sigma_end)
                                                / math.log(_gamma(256)) - 1e-9)
    ratio = (9.0 / sigma_end) ** (1 / (config.model.num_scales - 1))
    assert config.sampling.step_lr == noise.best_step_lr(5, ratio, sigma_end)
    assert sources == {"sigma_begin": "proposed by StatisticsGen",
                       "num_scales": "proposed by StatisticsGen",
                       "step_lr": "proposed by StatisticsGen", "n_iters": "pipeline override"}

    # ε follows the final table and T: here L = 20 and T = 1, given as KFP passes a dict
    # parameter (JSON numbers: 20.0), which must not reach the config as floats.
    config, _ = trainer.training_config(*artifacts, {"num_scales": 20.0, "n_steps_each": 1.0,
                                                      "sigma_begin": 12.0})
    assert (config.model.sigma_begin, config.model.num_scales) == (12.0, 20)
    assert type(config.model.num_scales) is int and type(config.sampling.n_steps_each) is int
    ratio = (12.0 / sigma_end) ** (1 / 19)
    assert config.sampling.step_lr == noise.best_step_lr(1, ratio, sigma_end)
    assert config.sampling.step_lr != noise.best_step_lr(5, ratio, sigma_end)

    config, sources = trainer.training_config(*artifacts, {}, use_proposed_noise=False)
    assert (config.model.sigma_begin, config.model.num_scales, config.sampling.step_lr) == (
        preset.model.sigma_begin, preset.model.num_scales, preset.sampling.step_lr)
    assert sources == {}


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 32}, "cannot change the data"),
    ({"no_such_field": 1}, "Unknown config field"),
    ({"batch_size": 0}, "batch_size"),
])
def test_training_config_rejects_bad_overrides(artifacts, overrides, message):
    with pytest.raises(ValueError, match=message):
        trainer.training_config(*artifacts, overrides)


def _measured(fid, **changes):
    metrics = {"fid": fid, "network": "net", "num_samples": 100,
               "reference": {"split": "eval", "num_images": 50, "source": "digits"}}
    return dict(metrics, **changes)


@pytest.mark.parametrize("fid, threshold, baseline, blessed, reason", [
    (10.0, 0.0, None, True, "no pushed model"),
    (10.0, 12.0, None, True, "FID 10 <= threshold 12"),
    (10.0, 9.0, None, False, "FID 10 > threshold 9"),
    (10.0, 0.0, PushedModel(3, "p", _measured(11.0)), True, "FID 10 <= 11 of pushed version 3"),
    (10.0, 0.0, PushedModel(3, "p", _measured(10.0)), True, "FID 10 <= 10 of pushed version 3"),
    (10.0, 12.0, PushedModel(3, "p", _measured(9.5)), False, "FID 10 > 9.5 of pushed version 3"),
    (10.0, 0.0, PushedModel(3, "p", _measured(1.0, network="other")), True,
     "evaluated differently (network); not compared"),
    (10.0, 0.0, PushedModel(3, "p", _measured(1.0, num_samples=5)), True,
     "evaluated differently (num_samples); not compared"),
    (10.0, 0.0, PushedModel(2, "p", None), True, "version 2 has no pipeline evaluation"),
    (float("nan"), 0.0, None, False, "FID is nan"),
])
def test_blessing(fid, threshold, baseline, blessed, reason):
    verdict = evaluator.bless(_measured(fid), threshold, baseline)
    assert verdict.blessed == blessed
    assert any(reason in line for line in verdict.reasons), verdict.reasons


def test_salted_records_land_in_their_split():
    for split in ("train", "eval"):
        for png in (b"", b"\x89PNG one", b"\x89PNG two", bytes(range(256))):
            record = example_gen.salted_record(png, split)
            bucket = tf.strings.to_hash_bucket_fast(record, data.TEST_BUCKETS).numpy()
            assert (bucket == 0) == (split == "eval")
            parsed = tf.train.Example.FromString(record).features.feature
            assert parsed["image"].bytes_list.value == [png]
