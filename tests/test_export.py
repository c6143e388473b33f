"""ncsn_tf.export: the SavedModel's signatures, bounds, metadata, versioning and that it runs
without our Python code (tf.saved_model.load and saved_model_cli in a separate process)."""
import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from tensorflow.core.protobuf import saved_model_pb2

from ncsn_tf import export, serving, models, sampling
from ncsn_tf.config import presets
from ncsn_tf import images as image_io

CONFIG = presets.override(presets.get("digits"), ngf=4, num_scales=4, n_steps_each=1,
                          step_lr=2e-5, denoise=True, sampling_batch_size=4)
LIMITS = serving.ServingLimits(max_batch=4, max_n_steps_each=3)
STEP = 1234
SHAPE = (16, 16, 1)


@pytest.fixture(scope="module")
def net():
    keras.utils.set_random_seed(0)
    return models.build(CONFIG)


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory):
    base = tmp_path_factory.mktemp("saved_models")
    for name in ("3", "latest", "10.5"):  # an older version and names TF Serving ignores
        os.makedirs(base / "tiny" / name)
    (base / "tiny" / "17").write_text("a file, not a version directory")
    path = serving.export(net, CONFIG, STEP, str(base), "tiny", limits=LIMITS,
                         checkpoint="somewhere/ckpt-1234")
    return path


@pytest.fixture(scope="module")
def model(exported):
    return tf.saved_model.load(exported)


@pytest.fixture(scope="module")
def library(net):
    """The library's samplers (with and without denoising) on the exported network."""
    score_fn = tf.function(lambda x, labels: net(x, labels, training=False))
    return {denoise: sampling.AnnealedLangevin(
        score_fn, net.sigmas, SHAPE, n_steps_each=CONFIG.sampling.n_steps_each,
        step_lr=CONFIG.sampling.step_lr, denoise=denoise) for denoise in (True, False)}


def _seeds(*values):
    return tf.constant(values, tf.int64)


def test_version_and_metadata(exported, model):
    assert exported == os.path.join(os.path.dirname(exported), "4")  # after "3"
    assert sorted(os.listdir(os.path.dirname(exported))) == ["10.5", "17", "3", "4", "latest"]
    meta = serving.read_metadata(exported)
    assert meta["step"] == STEP
    assert meta["checkpoint"] == "somewhere/ckpt-1234"
    assert presets.Config.from_dict(meta["config"]) == CONFIG
    assert meta["sampler"] == {"name": "ald", "nfe": 4 * 1 + 1, "n_steps_each": 1,
                               "step_lr": 2e-5, "denoise": True, "inpaint": "ald"}
    assert meta["bounds"]["max_batch"] == 4
    assert meta["bounds"]["max_step_lr"] == pytest.approx(CONFIG.model.sigma_end ** 2)
    assert int(model.step.numpy()) == STEP
    assert set(model.signatures) == set(serving.SIGNATURES)
    # The same settings, served: what a client needs to call sample_with_settings sensibly.
    served = model.signatures["sampler_settings"](seed=tf.constant([0], tf.int64))["json"]
    assert json.loads(served.numpy()) == {k: v for k, v in meta.items()
                                          if k not in ("checkpoint", "config")}


def test_graph_is_plain_tensorflow_without_xla(exported):
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(exported, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    ops = {n.op for n in graph.node} | {n.op for fn in graph.library.function
                                        for n in fn.node_def}
    assert "While" in ops or "StatelessWhile" in ops  # the Langevin loop is in the graph
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    assert not [fn.signature.name for fn in graph.library.function
                if fn.attr["_XlaMustCompile"].b]


def test_sampling_signatures_are_seed_deterministic(library, model):
    serve = model.signatures["serving_default"]
    out = serve(seed=_seeds(7, 8, 9))
    assert out["images"].dtype == tf.uint8 and out["images"].shape == (3, *SHAPE)
    assert out["png_bytes"].dtype == tf.string and out["png_bytes"].shape == (3,)
    # One image per seed, whatever else is in the batch.
    other = serve(seed=_seeds(9, 1, 7))["images"].numpy()
    np.testing.assert_array_equal(other[0], out["images"][2])
    np.testing.assert_array_equal(other[2], out["images"][0])
    assert not np.array_equal(out["images"][0], out["images"][1])
    # The same images as the library's sampler on the network that was exported.
    expected = image_io.to_uint8(library[True].sample(_seeds(7, 8, 9))["samples"])
    np.testing.assert_array_equal(out["images"], expected)
    for png, image in zip(out["png_bytes"], out["images"]):
        np.testing.assert_array_equal(tf.io.decode_png(png), image)

    with_settings = model.signatures["sample_with_settings"]
    same = with_settings(seed=_seeds(8), n_steps_each=tf.constant(1),
                         step_lr=tf.constant(2e-5), denoise=tf.constant(True))
    np.testing.assert_array_equal(same["images"][0], out["images"][1])
    plain = with_settings(seed=_seeds(8), n_steps_each=tf.constant(2),
                          step_lr=tf.constant(1e-5), denoise=tf.constant(False))
    expected = library[False].sample(_seeds(8), n_steps_each=2, step_lr=1e-5)
    np.testing.assert_array_equal(plain["images"], image_io.to_uint8(expected["samples"]))


def test_inpaint_keeps_known_pixels(model):
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(2, *SHAPE)).astype(np.float32)
    mask = np.zeros((2, 16, 16, 1), np.float32)
    mask[:, :, :8] = 1  # keep the left half
    out = model.signatures["inpaint"](image=tf.constant(image), mask=tf.constant(mask),
                                      seed=_seeds(3, 4))
    images = out["images"].numpy()
    expected_known = np.floor(image * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(images[:, :, :8], expected_known[:, :, :8])
    assert np.mean(images[:, :, 8:] != expected_known[:, :, 8:]) > 0.5
    for png, im in zip(out["png_bytes"], images):
        np.testing.assert_array_equal(tf.io.decode_png(png), im)


def test_score_signature_is_the_network(net, model):
    x = np.random.default_rng(1).uniform(size=(3, *SHAPE)).astype(np.float32)
    levels = np.array([0, 3, 1], np.int32)
    score = model.signatures["score"](x=tf.constant(x), noise_level=tf.constant(levels))
    expected = net(x, levels, training=False)
    np.testing.assert_allclose(score["score"], expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("signature, inputs, message", [
    ("serving_default", dict(seed=[]), "seed must be a list of 1 to 4 seeds"),
    ("serving_default", dict(seed=[1, 2, 3, 4, 5]), "seed must be a list of 1 to 4 seeds"),
    ("serving_default", dict(seed=7), "seed must be a list of 1 to 4 seeds, one image per seed "
                                      "(shape [N], e.g. [0, 1, 2]); got shape"),
    ("serving_default", dict(seed=[[1, 2]]), "(shape [N], e.g. [0, 1, 2]); got shape"),
    ("sample_with_settings", dict(seed=[[1]]), "seed must be a list of 1 to 4 seeds"),
    ("sample_with_settings", dict(n_steps_each=0), "n_steps_each must be in [1, 3]"),
    ("sample_with_settings", dict(n_steps_each=4), "n_steps_each must be in [1, 3]"),
    ("sample_with_settings", dict(step_lr=0.0), "step_lr must be in (0, 0.0001]"),
    ("sample_with_settings", dict(step_lr=0.5), "step_lr must be in (0, 0.0001]"),
    ("sample_with_settings", dict(step_lr=float("nan")), "step_lr must be in (0, 0.0001]"),
    ("inpaint", dict(image=np.zeros((1, 8, 8, 1))), "image must have shape [N, 16, 16, 1]"),
    ("inpaint", dict(image=np.full((1, 16, 16, 1), 2.0)), "image values must be in [0, 1]"),
    ("inpaint", dict(mask=np.ones((1, 16, 16, 3))), "mask must have shape [N, 16, 16, 1]"),
    ("inpaint", dict(mask=np.full((1, 16, 16, 1), 0.5)), "mask must contain only 0"),
    ("inpaint", dict(image=np.zeros((16, 16, 1))), "image must have shape [N, 16, 16, 1]"),
    ("inpaint", dict(mask=np.ones((16, 16, 1))), "mask must have shape [N, 16, 16, 1]"),
    ("inpaint", dict(mask=np.ones(())), "mask must have shape [N, 16, 16, 1]"),
    ("inpaint", dict(seed=[1, 2]), "inpaint needs a list of seeds, one per image"),
    ("inpaint", dict(seed=1), "inpaint needs a list of seeds, one per image"),
    ("score", dict(noise_level=[4]), "noise_level must be a list of one index in [0, 4)"),
    ("score", dict(noise_level=0), "noise_level must be a list of one index in [0, 4)"),
    ("score", dict(x=np.zeros((16, 16, 1))), "x must have shape [N, 16, 16, 1]"),
    ("score", dict(x=np.zeros(())), "x must have shape [N, 16, 16, 1]"),
    ("score", dict(x=np.zeros((1, 16, 16, 3))), "x must have shape [N, 16, 16, 1]"),
    ("score", dict(x=np.zeros((5, 16, 16, 1)), noise_level=[0] * 5),
     "x must have shape [N, 16, 16, 1] with 1 <= N <= 4"),
])
def test_requests_out_of_bounds_are_invalid_argument(model, signature, inputs, message):
    valid = {
        "serving_default": dict(seed=[1]),
        "sample_with_settings": dict(seed=[1], n_steps_each=1, step_lr=1e-5, denoise=True),
        "inpaint": dict(image=np.zeros((1, *SHAPE)), mask=np.ones((1, 16, 16, 1)), seed=[1]),
        "score": dict(x=np.zeros((1, *SHAPE)), noise_level=[0]),
    }[signature]
    fn = model.signatures[signature]
    specs = fn.structured_input_signature[1]
    args = {k: tf.constant(v, specs[k].dtype) for k, v in {**valid, **inputs}.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match="assertion failed") as error:
        fn(**args)
    assert message in error.value.message


def test_settings_out_of_bounds_are_rejected_at_export(net, tmp_path):
    bad = [(dict(step_lr=2e-4), {}), (dict(n_steps_each=4), {}), ({}, dict(max_batch=0)),
           (dict(step_lr=-1.0), {})]
    for sampler_settings, limits in bad:
        with pytest.raises(ValueError, match="Invalid export settings"):
            serving.export(net, presets.override(CONFIG, **sampler_settings), 0, str(tmp_path),
                           "tiny", limits=dataclasses.replace(LIMITS, **limits))
    assert not os.path.exists(tmp_path / "tiny")


@pytest.mark.parametrize("name", ["7", "..", ".", "", "a/b", "/abs", "../x", "a\\b", " x"])
def test_model_names_that_leave_the_base_path_are_refused(net, tmp_path, name):
    """One check for export and the pipeline's pusher: nothing is written anywhere."""
    from pipelines import pusher
    base = tmp_path / "base" / "inner"
    with pytest.raises(ValueError, match="must be a plain, non-numeric directory name"):
        serving.export(net, CONFIG, 0, str(base), name, limits=LIMITS)
    with pytest.raises(ValueError, match="must be a plain, non-numeric directory name"):
        pusher.push(str(tmp_path / "no-workdir"), str(base), name, {})
    assert not (tmp_path / "base").exists()
    assert serving.check_model_name("ncsn-v2.1_b") == "ncsn-v2.1_b"


def test_staging_folders_of_killed_exports_are_removed(tmp_path):
    """Left by a process that is gone (same host, dead pid) or older than a day: removed at
    the next export; a running export's folder is kept."""
    import socket
    import subprocess
    import sys
    import time
    model_dir = tmp_path / "m"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    dead = model_dir / f"{serving.versions.TEMP_PREFIX}{host}-{gone}-abc"
    running = model_dir / f"{serving.versions.TEMP_PREFIX}{host}-{os.getpid()}-def"
    old = model_dir / f"{serving.versions.TEMP_PREFIX}elsewhere-1-ghi"
    recent = model_dir / f"{serving.versions.TEMP_PREFIX}elsewhere-2-jkl"
    for folder in (dead, running, old, recent):
        os.makedirs(folder / "variables")
    os.utime(old, (time.time() - 2 * 86_400,) * 2)
    path = serving.save_version(lambda d: open(os.path.join(d, "saved_model.pb"), "w").close(),
                               str(model_dir))
    assert path == str(model_dir / "1")
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(["1", running.name,
                                                                  recent.name])


def test_next_version(tmp_path):
    assert serving.next_version(str(tmp_path / "missing")) == 1
    for name in ("1", "2", "9", "latest", ".tmp-export-x", "3.0"):
        os.makedirs(tmp_path / name)
    (tmp_path / "42").write_text("")
    assert serving.next_version(str(tmp_path)) == 10


def test_version_directory_appears_atomically(tmp_path):
    model_dir = str(tmp_path / "m")
    os.makedirs(os.path.join(model_dir, "5"))
    seen = []

    def write(directory):
        seen.append(sorted(os.listdir(model_dir)))
        assert os.path.dirname(directory) == model_dir  # same filesystem as the target
        with open(os.path.join(directory, "saved_model.pb"), "w") as f:
            f.write("model")

    path = serving.save_version(write, model_dir)
    assert path == os.path.join(model_dir, "6")
    staging = [name for name in seen[0] if name != "5"]  # while writing: only a temp dir
    assert len(staging) == 1 and not staging[0].isdigit()
    assert sorted(os.listdir(model_dir)) == ["5", "6"]
    assert open(os.path.join(path, "saved_model.pb")).read() == "model"

    def failing_write(directory):
        with open(os.path.join(directory, "saved_model.pb"), "w") as f:
            f.write("half a model")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        serving.save_version(failing_write, model_dir)
    assert sorted(os.listdir(model_dir)) == ["5", "6"]  # no new version, no temp dir left


def test_object_store_copies_saved_model_last(monkeypatch):
    model_dir = "ram://bucket/models/tiny"
    tf.io.gfile.makedirs(model_dir + "/2")
    copied = []
    real_copy = tf.io.gfile.copy
    monkeypatch.setattr(tf.io.gfile, "copy", lambda src, dst, overwrite=False: (
        copied.append(dst), real_copy(src, dst, overwrite)))

    def write(directory):
        os.makedirs(os.path.join(directory, "variables"))
        for name in ("saved_model.pb", "fingerprint.pb", "variables/variables.index"):
            with open(os.path.join(directory, name), "w") as f:
                f.write(name)

    path = serving.save_version(write, model_dir)
    assert path == model_dir + "/3"
    assert copied[-1] == path + "/saved_model.pb" and len(copied) == 3
    with tf.io.gfile.GFile(path + "/variables/variables.index") as f:
        assert f.read() == "variables/variables.index"


_ISOLATED = r"""
import sys
try:
    import ncsn_tf
except ImportError:
    pass
else:
    sys.exit("ncsn_tf is importable: the test does not prove anything")
import keras
import numpy as np
import tensorflow as tf

model = tf.saved_model.load(sys.argv[1])
out = model.signatures["serving_default"](seed=tf.constant([5, 6], tf.int64))
np.save(sys.argv[2], out["images"].numpy())
decoded = np.stack([tf.io.decode_png(png).numpy() for png in out["png_bytes"]])
np.testing.assert_array_equal(decoded, out["images"].numpy())
"""


def test_runs_in_a_process_without_ncsn_tf(exported, model, tmp_path):
    # A package named ncsn_tf that fails to import shadows the real one (also an editable
    # install): the SavedModel must not need any of our Python code.
    shadow = tmp_path / "shadow" / "ncsn_tf"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ncsn_tf is hidden here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    script = tmp_path / "load_model.py"
    script.write_text(_ISOLATED)
    np.save(tmp_path / "seeds.npy", np.array([5, 6], np.int64))
    cli_out = tmp_path / "cli"
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    processes = [
        subprocess.Popen([sys.executable, str(script), exported, str(tmp_path / "load.npy")],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([cli if os.path.exists(cli) else "saved_model_cli", "run", "--dir",
                          exported, "--tag_set", "serve", "--signature_def", "serving_default",
                          "--inputs", f"seed={tmp_path / 'seeds.npy'}", "--outdir",
                          str(cli_out)],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True),
    ]
    for process in processes:
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, output[-3000:]
    expected = model.signatures["serving_default"](seed=_seeds(5, 6))["images"].numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "load.npy"), expected)
    np.testing.assert_array_equal(np.load(cli_out / "images.npy"), expected)


def test_cli_exports_an_imported_official_checkpoint(tmp_path):
    pytest.importorskip("torch", reason="torch reads the official .pth checkpoints")
    from ncsn_tf import convert

    official = os.path.join(os.path.dirname(__file__), "fixtures", "ncsnv2_reference")
    workdir = str(tmp_path / "official")
    convert.convert(os.path.join(official, "ncsnv2_28.pth"),
                    os.path.join(official, "ncsnv2_28.yml"), workdir)
    fv = flags.FlagValues()
    export.define_flags(fv)
    argv = fv(["export", f"--workdir={workdir}", f"--base_path={tmp_path / 'models'}",
               "--max_batch=1", "--n_steps_each=1"])
    export.main(argv, fv)
    loaded = tf.saved_model.load(str(tmp_path / "models" / "ncsn" / "1"))
    images = loaded.signatures["serving_default"](seed=_seeds(0))["images"]
    assert images.dtype == tf.uint8 and images.shape == (1, 28, 28, 1)
    assert serving.read_metadata(str(tmp_path / "models" / "ncsn" / "1"))["num_levels"] == 10


def test_cli_exports_a_workdir(net, tmp_path):
    from ncsn_tf.training import checkpoints

    workdir = str(tmp_path / "run")
    checkpoints.save_converted(workdir, CONFIG, net, net, 77)
    fv = flags.FlagValues()
    export.define_flags(fv)
    argv = fv(["export", f"--workdir={workdir}", f"--base_path={tmp_path / 'models'}",
               "--model_name=digits", "--max_batch=2", "--n_steps_each=2"])
    export.main(argv, fv)
    path = tmp_path / "models" / "digits" / "1"
    meta = serving.read_metadata(str(path))
    assert meta["step"] == 77 and meta["checkpoint"] == workdir
    assert meta["sampler"]["n_steps_each"] == 2 and meta["bounds"]["max_batch"] == 2
    fv = flags.FlagValues()
    export.define_flags(fv)
    argv = fv(["export", f"--workdir={tmp_path / 'nothing'}", f"--base_path={tmp_path}"])
    with pytest.raises(SystemExit, match="export: "):
        export.main(argv, fv)


def test_data_init_is_refused_unless_turned_off(net, tmp_path):
    """A served model samples from noise: a data_init config is refused with what to do, and
    --nodata_init exports it."""
    from ncsn_tf.training import checkpoints

    workdir = str(tmp_path / "run")
    checkpoints.save_converted(workdir, presets.override(CONFIG, data_init=True), net, net, 5)
    with pytest.raises(ValueError, match="data_init.*--nodata_init"):
        serving.export(net, presets.override(CONFIG, data_init=True), 5, str(tmp_path), "x",
                      limits=LIMITS)

    def run(*extra):
        fv = flags.FlagValues()
        export.define_flags(fv)
        export.main(fv(["export", f"--workdir={workdir}", f"--base_path={tmp_path / 'm'}",
                        *extra]), fv)

    with pytest.raises(SystemExit, match="export: .*data_init.*--nodata_init"):
        run()
    assert not (tmp_path / "m").exists()
    run("--nodata_init")
    assert not serving.read_metadata(str(tmp_path / "m" / "ncsn" / "1"))["config"]["sampling"][
        "data_init"]


def test_export_with_a_fast_sampler(net, tmp_path):
    """--sampler=heun: serving_default runs heun (as the library does, and as recorded with
    its NFE and settings); inpaint falls back to ald, which can inpaint."""
    config = presets.override(CONFIG, sampler="heun", num_steps=3, churn=5.0, s_noise=0.9)
    path = serving.export(net, config, STEP, str(tmp_path), "fast", limits=LIMITS)
    meta = serving.read_metadata(path)
    assert meta["sampler"]["name"] == "heun" and meta["sampler"]["nfe"] == 5
    assert meta["sampler"]["num_steps"] == 3 and meta["sampler"]["inpaint"] == "ald"
    assert (meta["sampler"]["churn"], meta["sampler"]["s_noise"]) == (5.0, 0.9)
    loaded = tf.saved_model.load(path)
    images = loaded.signatures["serving_default"](seed=_seeds(3, 4))["images"]
    heun = sampling.for_network(net, config)
    np.testing.assert_array_equal(images, image_io.to_uint8(heun.sample(_seeds(3, 4))["samples"]))
    image = np.full((1, *SHAPE), 0.5, np.float32)
    mask = np.zeros((1, 16, 16, 1), np.float32)
    mask[:, :8] = 1
    filled = loaded.signatures["inpaint"](image=tf.constant(image), mask=tf.constant(mask),
                                          seed=_seeds(1))["images"].numpy()
    np.testing.assert_array_equal(filled[0, :8], image_io.to_uint8(image)[0, :8])


def test_export_with_the_multistep_sampler(net, tmp_path):
    """--sampler=dpm: serving_default equals the library's dpm run; with η > 0 inpaint uses dpm
    itself, with η = 0 (the ODE, deterministic) it falls back to ald."""
    config = presets.override(CONFIG, sampler="dpm", num_steps=4)
    path = serving.export(net, config, STEP, str(tmp_path), "dpm", limits=LIMITS)
    meta = serving.read_metadata(path)
    assert (meta["sampler"]["name"], meta["sampler"]["nfe"], meta["sampler"]["inpaint"]) == (
        "dpm", 4, "dpm")
    loaded = tf.saved_model.load(path)
    images = loaded.signatures["serving_default"](seed=_seeds(3, 4))["images"]
    dpm = sampling.for_network(net, config)
    np.testing.assert_array_equal(images, image_io.to_uint8(dpm.sample(_seeds(3, 4))["samples"]))
    ode = serving.export(net, presets.override(config, eta=0.0), STEP, str(tmp_path), "ode",
                        limits=LIMITS)
    assert serving.read_metadata(ode)["sampler"]["inpaint"] == "ald"


def test_cli_fixes_the_sampler_and_its_settings(net, tmp_path):
    from ncsn_tf.training import checkpoints

    workdir = str(tmp_path / "run")
    checkpoints.save_converted(workdir, CONFIG, net, net, 9)
    fv = flags.FlagValues()
    export.define_flags(fv)
    export.main(fv(["export", f"--workdir={workdir}", f"--base_path={tmp_path / 'm'}",
                    "--sampler=heun", "--num_steps=4", "--churn=10"]), fv)
    meta = serving.read_metadata(str(tmp_path / "m" / "ncsn" / "1"))
    assert (meta["sampler"]["name"], meta["sampler"]["nfe"]) == ("heun", 7)
    assert meta["config"]["sampling"]["churn"] == 10.0
