r"""Draw samples from a trained model: `python -m ncsn_tf.sample`.

    python -m ncsn_tf.sample --workdir=runs/cifar10 --num_samples=64 --out=samples.png \
        --npz=samples.npz

Image i uses seed `--seed` + i: the same seed and settings give the same image (also in
another batch, and as seed `--seed` + i of an exported model's `serving_default`). The run goes
through the noise levels a chunk at a time, with a progress bar on stderr. Modes:

- default: the configured sampler (`--sampler`: ald, the paper's annealed Langevin dynamics,
  or the faster cas, pc, heun, dpm; `--num_steps`) from noise (`--data_init`: from perturbed test
  images instead); the number of score evaluations per image (NFE) is printed first;
- `--inpaint=IMAGE --mask=MASK`: completes one image `--num_samples` times; MASK is an image
  file whose white pixels (>= 128) are kept and black ones filled in, or one of `right_half`,
  `bottom_half`, `center`;
- `--interpolate`: `--num_samples` rows of `--n_interpolations` images blending the noise of
  seeds `--seed` + r and `--seed` + num_samples + r. It follows `--denoise` as sampling does
  (default on); the official interpolation never denoises: pass `--nodenoise` to match it.
  Images are clipped to [0, 1] (the official code clamps when it saves its PNG).

Inpainting and interpolation work with ald, cas and pc; heun (deterministic) refuses them.

`--npz` saves the images as uint8 [N, H, W, C] under `samples` (the input of
`python -m ncsn_tf.evaluate`), with their `seeds`.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import tensorflow as tf
from absl import app, flags

from ncsn_tf import cli, data, images, progress, sampling
from ncsn_tf.config import flags as config_flags
from ncsn_tf.config import presets, schema

NAMED_MASKS = ("right_half", "bottom_half", "center")
_SAMPLER_FIELDS = (*cli.SAMPLER_FIELDS, "sampling_batch_size")
_TRAJECTORY_COLUMNS = 8  # images shown per frame in the trajectory PNG


# ---- inputs ----

def read_mask(spec: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A 0/1 float32 mask [H, W, 1] (1 = keep the pixel) from an image file (white = keep) or
    one of `NAMED_MASKS`, which fill in the right half, bottom half or central square."""
    h, w, _ = shape
    if spec in NAMED_MASKS:
        mask = np.ones([h, w, 1], np.float32)
        if spec == "right_half":
            mask[:, w // 2:] = 0
        elif spec == "bottom_half":
            mask[h // 2:] = 0
        else:
            mask[h // 4:h - h // 4, w // 4:w - w // 4] = 0
        return mask
    if not tf.io.gfile.exists(spec):
        raise FileNotFoundError(f"--mask={spec} is neither an image file nor one of "
                                f"{', '.join(NAMED_MASKS)}")
    pixels = images.read_image(spec, (h, w, 1))
    return (pixels >= 128 / 255).astype(np.float32)


# ---- progress ----

class Progress:
    """A one-line progress bar over noise levels (levels done / L, images/s, ETA) on stderr.

    On a terminal it redraws in place; otherwise it prints a line every 10 seconds.
    """

    def __init__(self, num_images: int, num_levels: int, num_batches: int, stream=None):
        self.stream = stream or sys.stderr
        self.num_levels, self.num_batches = num_levels, num_batches
        self.interactive = self.stream.isatty()
        # Images done, counting a level as 1/L of an image.
        self.progress = progress.Progress(num_images, every_s=0 if self.interactive else 10)
        self.batch, self.batch_levels = 0, 0

    def update(self, batch: int, levels_done: int, batch_images: int) -> None:
        """Batch `batch` (0-based, of `batch_images` images) has run `levels_done` levels."""
        if batch != self.batch:
            self.batch, self.batch_levels = batch, 0
        self.progress.advance(batch_images * (levels_done - self.batch_levels) / self.num_levels)
        self.batch_levels = levels_done
        if not self.progress.due():
            return
        width = 24
        filled = round(width * levels_done / self.num_levels)
        line = (f"batch {batch + 1}/{self.num_batches} ({batch_images} images)  levels "
                f"{levels_done}/{self.num_levels} [{'=' * filled}{' ' * (width - filled)}]  "
                f"{self.progress.rate:.2f} images/s  ETA {progress.duration(self.progress.eta)}")
        end = "\n" if self.progress.finished or not self.interactive else ""
        self.stream.write(("\r" if self.interactive else "") + line + end)
        self.stream.flush()


# ---- sampling ----

def run_in_chunks(sampler: sampling.Sampler, seeds, *, data=None, image=None,
                  mask=None, levels_per_call: int = 1, on_chunk=None) -> dict:
    """`sampler.sample` (`.inpaint` given `image` and `mask`), `levels_per_call` noise levels
    per graph call, calling `on_chunk(levels_done)` after each; the samples are identical to
    the one-call run's. Returns "samples" and, if the sampler records them, "trajectory"
    (uint8 frames) and "diagnostics" (a list of (first step, per-step values) per chunk)."""
    x, memory = sampler.init(seeds, data), None
    frames, diagnostics = [], []
    for start in range(0, sampler.num_levels, levels_per_call):
        end = min(start + levels_per_call, sampler.num_levels)
        out = sampler.run_levels(x, seeds, start, end, image=image, mask=mask, memory=memory)
        x, memory = out["samples"], out.get("memory")
        if "trajectory" in out:
            frames.append(images.to_uint8(out["trajectory"]).numpy())
        if "diagnostics" in out:
            diagnostics.append((start * sampler.steps_per_level, out["diagnostics"]))
        if on_chunk:
            on_chunk(end)
    result = {"samples": sampler.finish(x, image=image, mask=mask)}
    if sampler.trajectory_every:
        result["trajectory"] = np.concatenate(frames, axis=0)
    if sampler.diagnostics:
        result["diagnostics"] = diagnostics
    return result


def interpolate(sampler: sampling.Sampler, seeds_a, seeds_b, n_interpolations: int,
                data=None) -> dict:
    """`sampler.interpolate` in one graph call, with its rows flattened: "samples"
    [rows · n_interpolations, ...] and the other outputs as `run_in_chunks` returns them."""
    out = sampler.interpolate(seeds_a, seeds_b, n_interpolations, data)
    out["samples"] = tf.reshape(out["samples"], (-1,) + sampler.shape)
    if "trajectory" in out:  # [frames, rows, k, ...] -> [frames, rows · k, ...]
        frames = out["trajectory"]
        out["trajectory"] = images.to_uint8(
            tf.reshape(frames, (frames.shape[0], -1) + sampler.shape)).numpy()
    if "diagnostics" in out:
        out["diagnostics"] = [(0, out["diagnostics"])]
    return out


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this CLI's flags on `flag_values`."""
    fv = dict(flag_values=flag_values)
    cli.define_model_source_flags(flag_values, "sampled")
    flags.DEFINE_integer("num_samples", 64, "Number of images (rows with --interpolate).", **fv)
    flags.DEFINE_string("out", "samples.png", "PNG grid to write.", **fv)
    flags.DEFINE_string("npz", None, "Also save the images as uint8 [N, H, W, C] under "
                        "'samples' (and their 'seeds') in this .npz, e.g. for FID.", **fv)
    flags.DEFINE_integer("seed", 0, "Image i uses seed --seed + i.", **fv)
    flags.DEFINE_string("inpaint", None, "Image file to complete (the model's size); needs "
                        "--mask.", **fv)
    flags.DEFINE_string("mask", None, "Inpainting mask: an image file, white = keep the pixel, "
                        f"black = fill it in; or one of {', '.join(NAMED_MASKS)}.", **fv)
    flags.DEFINE_boolean("interpolate", False, "Interpolate between the noise of two seeds "
                         "per row (the official angle scheme).", **fv)
    flags.DEFINE_integer("n_interpolations", 15, "Images per row with --interpolate.", **fv)
    config_flags.define_field_flag("data_init", "Default: from the config.", flag_values)
    flags.DEFINE_integer("trajectory_every", 0, "Also save x after every k-th Langevin step: "
                         "OUT_trajectory.png (one row per frame, the first "
                         f"{_TRAJECTORY_COLUMNS} images) and 'trajectory' in --npz.", **fv)
    flags.DEFINE_string("diagnostics_dir", None, "Write the official per-step diagnostics "
                        "(grad norm, image norm, SNR) of the first batch to TensorBoard here.",
                        **fv)
    flags.DEFINE_integer("levels_per_call", None, "Noise levels per graph call (progress "
                         "granularity). Default: about 1/50 of the levels.", **fv)
    flags.DEFINE_boolean("jit_compile", False, "Compile the sampler with XLA (meant for "
                         "GPUs/TPUs; slower on CPU, see README Benchmarks).", **fv)
    cli.define_sampler_flags(flag_values, _SAMPLER_FIELDS)
    for module in (cli, config_flags):  # --help lists the toolkit's flags too
        flags.adopt_module_key_flags(module, flag_values=flag_values)


def _check_flags(f) -> None:
    cli.model_source(f)
    if f.num_samples < 1:
        raise app.UsageError(f"--num_samples={f.num_samples} must be >= 1")
    if (f.inpaint is None) != (f.mask is None):
        raise app.UsageError("--inpaint and --mask go together: the image and which of its "
                             "pixels to keep.")
    if f.inpaint and (f.interpolate or f.data_init):
        raise app.UsageError("--inpaint cannot be combined with --interpolate or --data_init.")
    if f.interpolate and f.n_interpolations < 2:
        raise app.UsageError(f"--n_interpolations={f.n_interpolations} must be >= 2")
    if f.trajectory_every < 0:
        raise app.UsageError("--trajectory_every must be >= 0 (0 = off)")
    if f.levels_per_call is not None and f.levels_per_call < 1:
        raise app.UsageError("--levels_per_call must be >= 1")
    if not f.out.lower().endswith(".png"):
        raise app.UsageError(f"--out={f.out} must be a .png file")
    for name in ("out", "npz"):
        if f[name].value:
            _check_writable(f[name].value, f"--{name}")


def _check_writable(path: str, flag: str) -> None:
    """Refuses an output path that cannot be written, before any sampling (which it would
    otherwise lose)."""
    if tf.io.gfile.isdir(path):
        raise app.UsageError(f"{flag}={path} is a directory; give a file name")
    parent = os.path.dirname(path) or "."
    probe = os.path.join(parent, f".ncsn_tf-write-test-{os.getpid()}")
    try:
        tf.io.gfile.makedirs(parent)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise app.UsageError(f"{flag}={path} cannot be written ({detail}); choose another "
                             "path. Nothing was sampled.") from None


def _batches(n: int, size: int):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _write_outputs(f, samples: np.ndarray, seeds: np.ndarray, ncol: int | None,
                   trajectory: np.ndarray | None, context: np.ndarray | None = None) -> None:
    """The grid (`context` images first, e.g. an inpainting's input and what it kept), the
    trajectory grid and the .npz of the samples and their seeds."""
    for path in (f.out, f.npz):
        if path and os.path.dirname(path):
            tf.io.gfile.makedirs(os.path.dirname(path))
    shown = samples if context is None else np.concatenate([context, samples])
    images.save_image_grid(shown.astype(np.float32) / 255.0, f.out, ncol=ncol)
    written = [f.out]
    if trajectory is not None:
        frames = trajectory[:, :_TRAJECTORY_COLUMNS]
        path = os.path.splitext(f.out)[0] + "_trajectory.png"
        images.save_image_grid(
            frames.reshape((-1,) + frames.shape[2:]).astype(np.float32) / 255.0, path,
            ncol=frames.shape[1])
        written.append(path)
    if f.npz:
        images.save_samples(f.npz, samples, seeds,
                            **({} if trajectory is None else {"trajectory": trajectory}))
        written.append(f.npz)
    print(f"Wrote {', '.join(written)} ({len(samples)} images)")


def _check_sampler_supports(f, config: presets.Config) -> None:
    """Refuses inpainting or interpolation with a deterministic sampler, before any work."""
    name = config.sampling.sampler
    cls = sampling.SAMPLERS.get(name)
    if cls is None or cls.stochastic_with(config.sampling):
        return  # config validation names the choices
    if f.inpaint:
        raise app.UsageError(f"the {name} sampler cannot inpaint with these settings: "
                             "inpainting re-noises the known pixels at every level, which "
                             "only ald, cas, pc and dpm with --eta > 0 follow")
    if f.interpolate:
        raise app.UsageError(f"the {name} sampler cannot interpolate with these settings: "
                             "its chains do not follow the per-level noise that interpolation "
                             "blends; use ald, cas, pc or dpm with --eta > 0")


def _sample(f) -> None:
    from ncsn_tf.training import checkpoints

    source = cli.model_source(f)
    overrides = {k: f[k].value for k in _SAMPLER_FIELDS if f[k].value is not None}
    planned = presets.override(checkpoints.config_of(source), **overrides)
    _check_sampler_supports(f, planned)
    cli.check_memory(f.num_samples * (f.n_interpolations if f.interpolate else 1),
                     planned.data.image_size ** 2 * planned.data.channels,  # uint8
                     "sample in parts (--seed=S --num_samples=N for consecutive ranges of "
                     "seeds).")
    shape = (planned.data.image_size, planned.data.image_size, planned.data.channels)
    image = mask = starts = None
    if f.inpaint:  # a wrong size or a missing file is refused before the model loads
        image, mask = images.read_image(f.inpaint, shape), read_mask(f.mask, shape)
    net, config, step = checkpoints.load(source, ema=not f.no_ema, precision=f.precision)
    config = presets.override(config, **overrides)
    schema.validate(config)
    sampler = sampling.for_network(
        net, config, trajectory_every=f.trajectory_every,
        diagnostics=f.diagnostics_dir is not None, jit_compile=f.jit_compile)
    levels, n = sampler.num_levels, f.num_samples
    if config.sampling.data_init if f.data_init is None else f.data_init:
        starts = data.HeldOutImages(config)(np.arange(n))  # image i from held-out image i
    k = f.n_interpolations if f.interpolate else 1
    batches = _batches(n, max(1, config.sampling.sampling_batch_size // k))
    levels_per_call = f.levels_per_call or max(1, math.ceil(levels / 50))
    print(f"Sampling {n * k} images from step {step} with {sampler.name}: "
          f"{sampler.nfe()} score evaluations per image ({levels} levels), "
          f"denoise={sampler.denoise}, {len(batches)} batch(es)", file=sys.stderr)
    writer = tf.summary.create_file_writer(f.diagnostics_dir) if f.diagnostics_dir else None
    bar = Progress(n * k, levels, len(batches))
    seeds = np.arange(f.seed, f.seed + n, dtype=np.int64)
    samples, trajectories = [], []
    for b, (lo, hi) in enumerate(batches):
        batch_seeds = seeds[lo:hi]
        batch_starts = None if starts is None else starts[lo:hi]
        if f.interpolate:
            out = interpolate(sampler, batch_seeds, batch_seeds + n, k, batch_starts)
            bar.update(b, levels, (hi - lo) * k)
        else:
            batch_image = None if image is None else np.repeat(image[None], hi - lo, axis=0)
            out = run_in_chunks(
                sampler, batch_seeds, data=batch_starts, image=batch_image, mask=mask,
                levels_per_call=levels_per_call,
                on_chunk=lambda done, b=b, m=hi - lo: bar.update(b, done, m))
        samples.append(images.to_uint8(out["samples"]).numpy())
        if "trajectory" in out:
            trajectories.append(out["trajectory"])
        if writer and b == 0:
            for first_step, values in out["diagnostics"]:
                sampling.write_diagnostics(writer, values, first_step=first_step)
    if f.interpolate:
        seeds = np.stack([seeds, seeds + n], axis=1)
    context = None
    if f.inpaint:  # the input, then what the sampler was given (filled pixels grey)
        kept = np.where(mask > 0, image, 0.5)
        context = images.to_uint8(np.stack([image, kept])).numpy()
    _write_outputs(f, np.concatenate(samples), seeds, k if f.interpolate else None,
                   np.concatenate(trajectories, axis=1) if trajectories else None, context)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    f = flag_values
    try:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        _check_flags(f)
        _sample(f)
    except (app.UsageError, FileNotFoundError, ValueError) as e:  # incl. data.MissingDataError
        sys.exit(f"sample: {e}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
