"""`python -m ncsn_tf.sample`: grids, .npz arrays, seeds, inpainting, interpolation, data_init,
trajectories and errors, on a tiny workdir and on an imported official checkpoint."""
import io
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from ncsn_tf import models, sample, sampling
from ncsn_tf.training import checkpoints
from ncsn_tf.config import presets
from ncsn_tf import images as image_io

CONFIG = presets.override(presets.get("digits"), ngf=4, num_scales=4, n_steps_each=1,
                          sampling_batch_size=3)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(REPO, "tests", "fixtures", "ncsnv2_reference")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    keras.utils.set_random_seed(0)
    net, ema_net = models.build(CONFIG), models.build(CONFIG)
    path = str(tmp_path_factory.mktemp("run"))
    checkpoints.save_converted(path, CONFIG, net, ema_net, 300)
    return path


@pytest.fixture(scope="module")
def reference(workdir):
    """Seeds 3..7 sampled in one graph call by the library on the EMA network."""
    net, config, _ = checkpoints.load(workdir)
    sampler = sampling.AnnealedLangevin.from_config(
        lambda x, labels: net(x, labels, training=False), net.sigmas, config)
    return image_io.to_uint8(sampler.sample(np.arange(3, 8))["samples"]).numpy()


def run(*args):
    fv = flags.FlagValues()
    sample.define_flags(fv)
    sample.main(fv(["sample", *args]), fv)


def _png(path):
    return tf.io.decode_png(tf.io.read_file(str(path))).numpy()


TILE = 64  # 16-px images are shown 4x enlarged (nearest neighbour) in the PNG grids


def _cell(grid, r, c, size=16, padding=2):
    """The image in row r, column c of a grid, at its own size (every 4th pixel)."""
    top, left = padding + r * (TILE + padding), padding + c * (TILE + padding)
    step = TILE // size
    return grid[top:top + TILE:step, left:left + TILE:step]


def test_samples_grid_npz_and_seeds(workdir, reference, tmp_path):
    # 5 images in batches of 3 and 2, one noise level per call: the same images as one call.
    run(f"--workdir={workdir}", "--num_samples=5", "--seed=3", f"--out={tmp_path}/s.png",
        f"--npz={tmp_path}/s.npz")
    saved = np.load(tmp_path / "s.npz")
    assert saved["samples"].dtype == np.uint8 and saved["samples"].shape == (5, 16, 16, 1)
    np.testing.assert_array_equal(saved["seeds"], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(saved["samples"], reference)
    grid = _png(tmp_path / "s.png")
    assert grid.shape == (2 * 66 + 2, 3 * 66 + 2, 1)  # ⌈√5⌉ = 3 columns, 2 rows
    for i in range(5):
        np.testing.assert_array_equal(_cell(grid, *divmod(i, 3)), reference[i])
    # Other seeds, batch split and chunking: image of seed s is the same.
    run(f"--checkpoint={workdir}/checkpoints/ckpt-300", "--num_samples=2", "--seed=5",
        "--levels_per_call=3", f"--out={tmp_path}/t.png", f"--npz={tmp_path}/t.npz")
    np.testing.assert_array_equal(np.load(tmp_path / "t.npz")["samples"], reference[2:4])


def test_inpaint_keeps_the_known_pixels(workdir, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 1), dtype=np.uint8)
    tf.io.write_file(str(tmp_path / "image.png"), tf.io.encode_png(image))
    mask = np.zeros((16, 16, 1), np.uint8)
    mask[:6] = 255  # keep the top 6 rows
    tf.io.write_file(str(tmp_path / "mask.png"), tf.io.encode_png(mask))
    run(f"--workdir={workdir}", "--num_samples=2", f"--inpaint={tmp_path}/image.png",
        f"--mask={tmp_path}/mask.png", f"--out={tmp_path}/in.png", f"--npz={tmp_path}/in.npz")
    samples = np.load(tmp_path / "in.npz")["samples"]
    assert samples.shape == (2, 16, 16, 1)
    np.testing.assert_array_equal(samples[:, :6], np.broadcast_to(image[:6], (2, 6, 16, 1)))
    assert np.mean(samples[:, 6:] != image[6:]) > 0.5
    assert not np.array_equal(samples[0, 6:], samples[1, 6:])  # one completion per seed
    # The grid shows the input, then the kept pixels (the rest grey), then the completions.
    grid = _png(tmp_path / "in.png")
    assert grid.shape == (2 + 2 * 66, 2 + 2 * 66, 1)  # 2 x 2 tiles of 64 px, 2 px padding
    cells = [grid[2 + 66 * r:66 + 66 * r:4, 2 + 66 * c:66 + 66 * c:4] for r in range(2)
             for c in range(2)]
    np.testing.assert_array_equal(cells[0], image)
    np.testing.assert_array_equal(cells[1][:6], image[:6])
    assert (cells[1][6:] == 128).all()
    np.testing.assert_array_equal(np.stack(cells[2:]), samples)


def test_named_masks():
    shape = (8, 6, 3)
    right = sample.read_mask("right_half", shape)[..., 0]
    np.testing.assert_array_equal(right, np.repeat([[1, 1, 1, 0, 0, 0]], 8, 0))
    bottom = sample.read_mask("bottom_half", shape)[..., 0]
    np.testing.assert_array_equal(bottom, np.repeat([[1]] * 4 + [[0]] * 4, 6, 1))
    center = sample.read_mask("center", shape)[..., 0]
    assert center.sum() == 8 * 6 - 4 * 4 and center[2:6, 1:5].sum() == 0


def test_interpolate_rows_start_from_the_seed_samples(workdir, reference, tmp_path):
    run(f"--workdir={workdir}", "--interpolate", "--num_samples=2", "--n_interpolations=3",
        "--seed=3", f"--out={tmp_path}/i.png", f"--npz={tmp_path}/i.npz")
    saved = np.load(tmp_path / "i.npz")
    samples = saved["samples"].reshape(2, 3, 16, 16, 1)
    np.testing.assert_array_equal(saved["seeds"], [[3, 5], [4, 6]])
    # Angle 0 uses only the first seed's noise: exactly the plain sample of that seed.
    np.testing.assert_array_equal(samples[:, 0], reference[:2])
    assert not np.array_equal(samples[:, 2], reference[:2])
    grid = _png(tmp_path / "i.png")
    assert grid.shape == (2 * 66 + 2, 3 * 66 + 2, 1)  # one row per pair of seeds
    np.testing.assert_array_equal(_cell(grid, 1, 2), samples[1, 2])

    # --nodenoise (as the official interpolation, which never denoises): angle 0 is then the
    # plain sample without the final denoising step.
    run(f"--workdir={workdir}", "--interpolate", "--num_samples=2", "--n_interpolations=3",
        "--seed=3", "--nodenoise", f"--out={tmp_path}/n.png", f"--npz={tmp_path}/n.npz")
    raw = np.load(tmp_path / "n.npz")["samples"].reshape(2, 3, 16, 16, 1)
    net, config, _ = checkpoints.load(workdir)
    plain = sampling.AnnealedLangevin.from_config(
        lambda x, labels: net(x, labels, training=False), net.sigmas, config, denoise=False)
    np.testing.assert_array_equal(
        raw[:, 0], image_io.to_uint8(plain.sample(np.arange(3, 5))["samples"]).numpy())
    assert not np.array_equal(raw[:, 0], samples[:, 0])


def test_data_init_trajectory_and_diagnostics(workdir, reference, tmp_path):
    run(f"--workdir={workdir}", "--data_init", "--num_samples=2", "--seed=3",
        "--trajectory_every=2", f"--diagnostics_dir={tmp_path}/tb", f"--out={tmp_path}/d.png",
        f"--npz={tmp_path}/d.npz")
    saved = np.load(tmp_path / "d.npz")
    assert saved["samples"].shape == (2, 16, 16, 1)
    assert not np.array_equal(saved["samples"], reference[:2])  # other starting points
    # L·T = 4 steps, a frame after every 2nd: 2 frames of both images.
    assert saved["trajectory"].dtype == np.uint8 and saved["trajectory"].shape == (2, 2, 16,
                                                                                   16, 1)
    assert _png(tmp_path / "d_trajectory.png").shape == (2 * 66 + 2, 2 * 66 + 2, 1)
    assert tf.io.gfile.glob(f"{tmp_path}/tb/events.out.tfevents.*")


def test_chunked_diagnostics_count_every_update_step_of_pc():
    """pc takes corrector_steps + 1 updates per level: chunk k of one level starts at step
    2k, and the chunks' step numbers tile the run without overlap."""
    config = presets.override(presets.get("digits"), ngf=4, num_scales=3, sampler="pc",
                              num_steps=3, corrector_steps=1)
    keras.utils.set_random_seed(0)
    net = models.build(config)
    sampler = sampling.for_network(net, config, diagnostics=True)
    assert sampler.steps_per_level == 2
    out = sample.run_in_chunks(sampler, np.array([0, 1], np.int64), levels_per_call=1)
    firsts = [first for first, _ in out["diagnostics"]]
    lengths = [len(values["level"]) for _, values in out["diagnostics"]]
    assert firsts == [0, 2, 4] and lengths == [2, 2, 2]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_counts_levels_and_images():
    stream = _Terminal()
    progress = sample.Progress(num_images=5, num_levels=4, num_batches=2, stream=stream)
    for done in (2, 4):
        progress.update(0, done, 3)
    progress.update(1, 4, 2)
    lines = stream.getvalue().split("\r")[1:]
    assert len(lines) == 3
    assert lines[0].startswith("batch 1/2 (3 images)  levels 2/4 [" + "=" * 12 + " " * 12 + "]")
    assert progress.progress.done == pytest.approx(5)
    assert lines[-1].startswith("batch 2/2 (2 images)  levels 4/4 [" + "=" * 24 + "]")
    assert lines[-1].endswith("ETA 0:00:00\n") and "images/s" in lines[-1]


@pytest.mark.parametrize("args, message", [
    (["--workdir={tmp}/missing"], "is neither a workdir nor a checkpoint prefix"),
    (["--workdir={workdir}", "--checkpoint={workdir}"], "exactly one of --workdir"),
    (["--workdir={workdir}", "--inpaint={tmp}/image.png"], "--inpaint and --mask go together"),
    (["--workdir={workdir}", "--inpaint={tmp}/image.png", "--mask={tmp}/small.png"],
     "but the model makes 16x16 images"),
    (["--workdir={workdir}", "--inpaint={tmp}/none.png", "--mask=center"], "does not exist"),
    (["--workdir={workdir}", "--out={tmp}/x.jpg"], "must be a .png file"),
    (["--workdir={workdir}", "--step_lr=-1"], "--step_lr=-1.0 must be > 0"),
    (["--workdir={workdir}", "--sampler=pc", "--num_steps=-2"], "--num_steps=-2 must be >= 0"),
    (["--workdir={workdir}", "--sampler=cas", "--step_lr=1e-9"],
     "cas needs step_lr/sigma_min^2 in [1 - 1/gamma, 1)"),
    (["--workdir={workdir}", "--sampler=heun", "--interpolate"], "heun sampler cannot "
     "interpolate"),
    (["--workdir={workdir}", "--sampler=heun", "--inpaint={tmp}/image.png", "--mask=center"],
     "heun sampler cannot inpaint"),
])
def test_errors_are_one_line(workdir, tmp_path, args, message):
    tf.io.write_file(str(tmp_path / "image.png"), tf.io.encode_png(np.zeros((16, 16, 1),
                                                                           np.uint8)))
    tf.io.write_file(str(tmp_path / "small.png"), tf.io.encode_png(np.zeros((8, 8, 1),
                                                                           np.uint8)))
    args = [a.format(tmp=tmp_path, workdir=workdir) for a in args]
    with pytest.raises(SystemExit, match="^sample: ") as error:
        run(f"--out={tmp_path}/o.png", *args)  # a later --out wins
    assert message in str(error.value)


@pytest.mark.parametrize("config_sampler, args, message", [
    ("ald", ["--sampler=heun", "--inpaint={tmp}/image.png", "--mask=center"],
     "heun sampler cannot inpaint"),
    ("heun", ["--inpaint={tmp}/image.png", "--mask=center"], "heun sampler cannot inpaint"),
    ("heun", ["--interpolate"], "heun sampler cannot interpolate"),
    ("dpm", ["--eta=0", "--interpolate"], "dpm sampler cannot interpolate"),
])
def test_unsupported_requests_are_refused_before_the_model_loads(
        tmp_path, monkeypatch, config_sampler, args, message):
    """Given by flag or by the run's own config, a sampler that cannot inpaint or interpolate
    is refused from config.yaml alone: no network is built or restored."""
    config = presets.override(presets.get("digits"), ngf=4, num_scales=3,
                              sampler=config_sampler)
    workdir = str(tmp_path / "w")
    checkpoints.save_converted(workdir, config, models.build(config), models.build(config), 1)
    tf.io.write_file(str(tmp_path / "image.png"), tf.io.encode_png(np.zeros((16, 16, 1),
                                                                           np.uint8)))

    def no_load(*_, **__):
        raise AssertionError("the model was loaded before the request was refused")

    monkeypatch.setattr(checkpoints, "load", no_load)
    with pytest.raises(SystemExit, match="^sample: ") as error:
        run(f"--workdir={workdir}", f"--out={tmp_path}/o.png",
            *[a.format(tmp=tmp_path) for a in args])
    assert message in str(error.value)


def test_official_checkpoint_from_the_importer(tmp_path):
    pytest.importorskip("torch", reason="torch reads the official .pth checkpoints")
    from ncsn_tf import convert

    workdir = str(tmp_path / "official")
    convert.convert(os.path.join(OFFICIAL, "ncsnv2_28.pth"),
                    os.path.join(OFFICIAL, "ncsnv2_28.yml"), workdir)
    # As a user runs it: a separate process through `python -m`.
    result = subprocess.run(
        [sys.executable, "-m", "ncsn_tf.sample", f"--workdir={workdir}", "--num_samples=2",
         "--n_steps_each=1", f"--out={tmp_path}/o.png", f"--npz={tmp_path}/o.npz"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "levels 10/10" in result.stderr  # the progress bar went through all levels
    samples = np.load(tmp_path / "o.npz")["samples"]
    assert samples.dtype == np.uint8 and samples.shape == (2, 28, 28, 1)
    assert _png(tmp_path / "o.png").shape == (2 + 86, 2 * 86 + 2, 1)  # 28 px shown at 84


@pytest.mark.parametrize("args, message", [
    (["--out={tmp}/file.txt/o.png"], "--out={tmp}/file.txt/o.png cannot be written"),
    (["--npz={tmp}"], "is a directory"),
    (["--num_samples=10000000000"],
     "10,000,000,000 images need 2,384.2 GiB to hold (256 bytes each)"),
    (["--inpaint={tmp}/big.png", "--mask=right_half"],
     "{tmp}/big.png is 64x64 pixels, but the model makes 16x16 images: resize it first"),
    (["--inpaint={tmp}/missing.png", "--mask=right_half"], "{tmp}/missing.png does not exist"),
])
def test_requests_that_would_fail_after_sampling_are_refused_first(
        tmp_path, monkeypatch, args, message):
    """An unwritable output, more images than memory holds, an image to inpaint of another
    size: refused from config.yaml alone, before the model loads."""
    config = presets.override(presets.get("digits"), ngf=4, num_scales=3)
    workdir = str(tmp_path / "w")
    checkpoints.save_converted(workdir, config, models.build(config), models.build(config), 1)
    (tmp_path / "file.txt").write_text("a file, not a folder")
    image_io.save_png(str(tmp_path / "big.png"), np.zeros((64, 64, 1), np.uint8))
    monkeypatch.setattr(checkpoints, "load", lambda *_, **__: pytest.fail("model loaded"))
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit, match="^sample: ") as error:
        run(f"--workdir={workdir}", f"--out={tmp_path}/o.png", *args)
    assert message.format(tmp=tmp_path) in str(error.value)


@pytest.mark.parametrize("name, num_steps, nfe", [("heun", 3, 5), ("dpm", 4, 4)])
def test_fast_sampler_prints_its_score_evaluations(workdir, tmp_path, capsys, name, num_steps,
                                                   nfe):
    """heun (2N − 1 score evaluations) and dpm (N; through the CLI's one-level chunks, which
    carry its memory): the library's one-graph images for the same seeds."""
    run(f"--workdir={workdir}", f"--sampler={name}", f"--num_steps={num_steps}",
        "--num_samples=2", "--seed=3", f"--out={tmp_path}/s.png", f"--npz={tmp_path}/s.npz")
    assert (f"with {name}: {nfe} score evaluations per image ({num_steps} levels)"
            in capsys.readouterr().err)
    net, config, _ = checkpoints.load(workdir)
    sampler = sampling.for_network(net, presets.override(config, sampler=name,
                                                         num_steps=num_steps))
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["samples"],
                                  image_io.to_uint8(sampler.sample([3, 4])["samples"]).numpy())
