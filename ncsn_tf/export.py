"""Export a score network as a TF Serving SavedModel: `python -m ncsn_tf.export`.

The model is written to `BASE_PATH/MODEL_NAME/VERSION/`, TF Serving's layout, with VERSION one
more than the highest integer directory already there (TF Serving serves the highest). The
version directory appears atomically: everything is written under a hidden, non-numeric
sibling name on the same filesystem and then renamed, so a server polling the directory never
sees half a model. Object stores (`gs://`, `s3://`) have no atomic rename: there the model is
written to a local temporary directory and copied into the version prefix with `saved_model.pb`
last (see saved_models/README.md for serving from object stores).

Signatures, all plain TensorFlow ops (no Python at serving time, no XLA):

    serving_default       seed int64 [N]                 -> images uint8 [N, H, W, C],
                                                            png_bytes string [N]
    sample_with_settings  seed int64 [N], n_steps_each int32 [], step_lr float32 [],
                          denoise bool []                -> images, png_bytes
    inpaint               image float32 [N, H, W, C] in [0, 1], mask float32 [N, H, W, 1 or C]
                          (1 = keep the pixel, 0 = fill it in), seed int64 [N]
                                                         -> images, png_bytes
    sampler_settings      seed int64 [N] (ignored: TF Serving needs an input)
                                                         -> json string []: what
                          serving_default does (sampler, NFE, settings, bounds, step)
    score                 x float32 [N, H, W, C] in [0, 1], noise_level int32 [N] (index into
                          the σ table)                   -> score float32 [N, H, W, C]

`serving_default` runs the sampler chosen at export (`--sampler`: ald, cas, pc, heun or dpm, with
its settings; ald by default), `sample_with_settings` annealed Langevin dynamics with the
request's T and ε, `inpaint` the chosen sampler (ald when that one is deterministic: heun, or
dpm with eta = 0).
One image per seed; the same seed gives the same image whatever else is in the request. The
whole run is one graph (a `tf.while_loop`). Requests outside the bounds fixed
at export time (1 to `max_batch` seeds or images, 1 to `max_n_steps_each` steps per level,
0 < step_lr <= σ_L², images of the model's shape with values in [0, 1], a 0/1 mask) fail with
InvalidArgument and a message saying what is wrong.

Metadata: `assets.extra/ncsn_metadata.yaml` (training step, checkpoint, sampler name, NFE
and settings, bounds, signatures and the full training config), the same without the config
from the `sampler_settings` signature, and the variable `step` of the loaded object.
"""
from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
import yaml
from absl import app, flags, logging

from ncsn_tf import cli, sampling
from ncsn_tf.config import presets
from ncsn_tf import images as image_io

METADATA_FILE = os.path.join("assets.extra", "ncsn_metadata.yaml")
SIGNATURES = ("serving_default", "sample_with_settings", "inpaint", "score", "sampler_settings")
DEFAULT_MAX_N_STEPS_EACH = 20  # 4x the largest official T; a request costs L·T network calls
_TEMP_PREFIX = ".tmp-export-"
# Settings of the cas/pc/heun/dpm samplers that the CLI takes (besides sampler and num_steps).
_SAMPLER_SETTINGS = ("corrector_steps", "snr", "rho", "churn", "eta", "s_noise")


@dataclasses.dataclass(frozen=True)
class ServingSettings:
    """Sampler settings of `serving_default` and the bounds every signature enforces."""
    n_steps_each: int
    step_lr: float
    denoise: bool
    max_batch: int
    max_n_steps_each: int = DEFAULT_MAX_N_STEPS_EACH

    @classmethod
    def from_config(cls, config: presets.Config, **overrides: Any) -> "ServingSettings":
        """The settings of `config.sampling`, `max_batch` = its sampling batch size, with the
        non-None `overrides` applied."""
        values = dict(n_steps_each=config.sampling.n_steps_each,
                      step_lr=config.sampling.step_lr, denoise=config.sampling.denoise,
                      max_batch=config.sampling.sampling_batch_size)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def check(self, max_step_lr: float) -> None:
        """Raises ValueError, naming the flag, for settings outside the bounds."""
        problems = []
        if self.max_batch < 1:
            problems.append(f"--max_batch={self.max_batch} must be >= 1")
        if self.max_n_steps_each < 1:
            problems.append(f"--max_n_steps_each={self.max_n_steps_each} must be >= 1")
        if not 1 <= self.n_steps_each <= self.max_n_steps_each:
            problems.append(f"--n_steps_each={self.n_steps_each} must be in "
                            f"[1, --max_n_steps_each={self.max_n_steps_each}]")
        if not 0 < self.step_lr <= max_step_lr:
            problems.append(f"--step_lr={self.step_lr:g} must be in (0, sigma_L^2 = "
                            f"{max_step_lr:g}]")
        if problems:
            raise ValueError("Invalid export settings:\n  " + "\n  ".join(problems))


class ServingModule(tf.Module):
    """What the SavedModel holds: the network's weights, `step` and the four signatures.

    `net(x, labels, training=False)` is traced once as a graph function that every signature
    calls. Only the weights are tracked (not the Keras model), so loading needs neither Keras
    nor ncsn_tf.
    """

    def __init__(self, net: keras.Model, config: presets.Config, step: int,
                 settings: ServingSettings):
        super().__init__(name="ncsn")
        size, channels = config.data.image_size, config.data.channels
        self.image_shape = (size, size, channels)
        sigmas = net.sigmas.numpy().astype(np.float64)
        self.num_levels = len(sigmas)
        self.max_step_lr = float(sigmas[-1] ** 2)
        settings.check(self.max_step_lr)
        self.settings = settings
        self.net_weights = [w.value for w in net.weights]  # plain tf.Variables
        self.step = tf.Variable(step, dtype=tf.int64, trainable=False, name="step")

        score_fn = tf.function(
            lambda x, labels: net(x, labels, training=False),
            input_signature=[tf.TensorSpec([None, *self.image_shape], tf.float32),
                             tf.TensorSpec([None], tf.int32)])
        common = dict(shape=self.image_shape, n_steps_each=settings.n_steps_each,
                      step_lr=settings.step_lr)
        sigma_table = net.sigmas.value
        # Two samplers differ only in the final denoising step; `serving_default` uses the
        # exported setting, `sample_with_settings` chooses per request.
        self._samplers = {
            denoise: sampling.AnnealedLangevin(score_fn, sigma_table, denoise=denoise, **common)
            for denoise in (True, False)}
        # `serving_default` (and `inpaint`, where it can) runs the configured sampler.
        self.sampler_name = config.sampling.sampler
        if self.sampler_name == "ald":
            self._default = self._samplers[settings.denoise]
        else:
            self._default = sampling.for_network(
                net, presets.override(config, denoise=settings.denoise))
        self.nfe = self._default.nfe()
        self._inpainter = (self._default if self._default.stochastic
                           else self._samplers[settings.denoise])
        # A JSON string: tf.Module would wrap a dict attribute in a tracking wrapper.
        self.settings_json = json.dumps({
            "step": int(step),
            "image_shape": list(self.image_shape),
            "num_levels": self.num_levels,
            "sampler": {"name": self.sampler_name, "nfe": self.nfe,
                        "n_steps_each": settings.n_steps_each, "step_lr": settings.step_lr,
                        "denoise": settings.denoise,
                        **({} if self.sampler_name == "ald" else
                           {"num_steps": sampling.num_steps(config)}),
                        "inpaint": self._inpainter.name},
            "bounds": {"max_batch": settings.max_batch,
                       "max_n_steps_each": settings.max_n_steps_each,
                       "max_step_lr": self.max_step_lr},
            "signatures": list(SIGNATURES),
        })

    # ---- signatures ----

    # Inputs are declared without a rank and checked in the graph, so that a request of the
    # wrong shape gets a message saying which shape is expected, whoever calls the signature.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64, name="seed")])
    def serving_default(self, seed):
        seed = self._check_seeds(seed)
        return _image_outputs(self._default.sample(seed)["samples"])

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64, name="seed"),
                                  tf.TensorSpec([], tf.int32, name="n_steps_each"),
                                  tf.TensorSpec([], tf.float32, name="step_lr"),
                                  tf.TensorSpec([], tf.bool, name="denoise")])
    def sample_with_settings(self, seed, n_steps_each, step_lr, denoise):
        seed = self._check_seeds(seed)
        n_steps_each, step_lr = self._check_settings(n_steps_each, step_lr)
        x = self._samplers[True].init(seed)
        x = self._samplers[True].run_levels(x, seed, 0, self.num_levels,
                                            n_steps_each=n_steps_each, step_lr=step_lr)
        x = tf.cond(denoise, lambda: self._samplers[True].finish(x["samples"]),
                    lambda: self._samplers[False].finish(x["samples"]))
        return _image_outputs(x)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="image"),
                                  tf.TensorSpec(None, tf.float32, name="mask"),
                                  tf.TensorSpec(None, tf.int64, name="seed")])
    def inpaint(self, image, mask, seed):
        image = self._check_images(image, "image")
        image = _check_request(image, tf.reduce_all((image >= 0.0) & (image <= 1.0)),
                         "image values must be in [0, 1] (float32; divide uint8 pixels by 255)")
        n = tf.shape(image)[0]
        seed = _check_request(seed, (tf.rank(seed) == 1) & (tf.size(seed) == n),
                              "inpaint needs a list of seeds, one per image (shape [N]); got "
                              "seeds of shape, images:", tf.shape(seed), n, shape=[None])
        h, w, c = self.image_shape
        mask_shape = tf.shape(mask)
        mask = _check_request(mask, _shape_is(mask_shape, [n, h, w, 1])
                              | _shape_is(mask_shape, [n, h, w, c]),
                              f"mask must have shape [N, {h}, {w}, 1] or [N, {h}, {w}, {c}] for "
                              "N images (1 where the pixel is kept); got shape", mask_shape)
        mask = tf.ensure_shape(tf.broadcast_to(mask, tf.shape(image)), [None, h, w, c])
        return _image_outputs(self._inpainter.inpaint(image, mask, seed)["samples"])

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x"),
                                  tf.TensorSpec(None, tf.int32, name="noise_level")])
    def score(self, x, noise_level):
        x = self._check_images(x, "x")
        n = tf.shape(x)[0]
        noise_level = _check_request(
            noise_level, (tf.rank(noise_level) == 1) & (tf.size(noise_level) == n)
            & tf.reduce_all((noise_level >= 0) & (noise_level < self.num_levels)),
            f"noise_level must be a list of one index in [0, {self.num_levels}) per image "
            "(shape [N]); got", noise_level, shape=[None])
        return {"score": self._samplers[True].score_fn(x, noise_level)}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64, name="seed")])
    def sampler_settings(self, seed):
        """`settings_json`: what serving_default does (TF Serving needs an input; the seeds are
        ignored)."""
        del seed
        return {"json": tf.constant(self.settings_json)}

    # ---- request checks: InvalidArgument with a message, before any work is done ----

    def _check_seeds(self, seed):
        limit = self.settings.max_batch
        n = tf.size(seed)
        return _check_request(seed, (tf.rank(seed) == 1) & (n >= 1) & (n <= limit),
                              f"seed must be a list of 1 to {limit} seeds, one image per seed "
                              "(shape [N], e.g. [0, 1, 2]); got shape", tf.shape(seed),
                              shape=[None])

    def _check_settings(self, n_steps_each, step_lr):
        limit = self.settings.max_n_steps_each
        n_steps_each = _check_request(n_steps_each, (n_steps_each >= 1) & (n_steps_each <= limit),
                                f"n_steps_each must be in [1, {limit}]; got", n_steps_each)
        step_lr = _check_request(step_lr, (step_lr > 0.0) & (step_lr <= self.max_step_lr),
                           f"step_lr must be in (0, {self.max_step_lr:g}] (sigma_L^2: larger "
                           "steps diverge at the last noise level); got", step_lr)
        return n_steps_each, step_lr

    def _check_images(self, images, name):
        h, w, c = self.image_shape
        limit = self.settings.max_batch
        shape = tf.shape(images)
        return _check_request(images, _shape_is(shape, [None, h, w, c])
                              & (tf.size(images) > 0) & (tf.size(images) <= limit * h * w * c),
                              f"{name} must have shape [N, {h}, {w}, {c}] with 1 <= N <= "
                              f"{limit}; got shape", shape, shape=[None, h, w, c])

    def signature_functions(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        return {name: getattr(self, name).get_concrete_function() for name in SIGNATURES}


def _shape_is(shape: tf.Tensor, expected: list) -> tf.Tensor:
    """Whether the 1-D `shape` is `expected` (ints, scalar tensors, or None for any size),
    without indexing past the end of a shape of another rank."""
    def same():
        return tf.reduce_all(tf.stack([tf.equal(shape[i], d) for i, d in enumerate(expected)
                                       if d is not None]))
    return tf.cond(tf.equal(tf.size(shape), len(expected)), same, lambda: tf.constant(False))


def _check_request(value, condition, message: str, *data, shape: list | None = None):
    """`value`, after an in-graph check that fails with InvalidArgument(message, data); with
    `shape` (None: any size), reshaped to it only where `condition` holds, so that no shape
    error can come before the message (TensorFlow does not order EnsureShape after it)."""
    with tf.control_dependencies([tf.debugging.Assert(condition, [message, *data],
                                                      summarize=16)]):
        if shape is None:
            return tf.identity(value)
        target = [-1 if d is None else d for d in shape]
        empty = [0 if d is None else d for d in shape]
        return tf.cond(condition, lambda: tf.reshape(value, target),
                       lambda: tf.zeros(empty, value.dtype))


def _image_outputs(samples):
    images = image_io.to_uint8(samples)
    return {"images": images,
            "png_bytes": tf.map_fn(tf.io.encode_png, images, fn_output_signature=tf.string)}


# ---- versioned, atomic writing ----

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
    return f"{_TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def remove_stale_temp_dirs(model_dir: str, max_age_s: float = 86_400.0) -> list[str]:
    """Removes the staging folders that killed exports left in `model_dir`: those of a process
    of this host that no longer runs, or older than `max_age_s`; never a running export's."""
    removed = []
    host = socket.gethostname()
    for path in glob.glob(os.path.join(model_dir, _TEMP_PREFIX + "*")):
        parts = os.path.basename(path)[len(_TEMP_PREFIX):].rsplit("-", 2)
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


def _write(module: ServingModule, export_dir: str, metadata: dict[str, Any],
           extra_files: dict[str, str]) -> None:
    tf.saved_model.save(module, export_dir, signatures=module.signature_functions())
    files = {METADATA_FILE: yaml.safe_dump(metadata, sort_keys=False), **extra_files}
    for rel, text in files.items():
        path = os.path.join(export_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


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


def export(net: keras.Model, config: presets.Config, step: int, base_path: str,
           model_name: str, *, settings: ServingSettings | None = None,
           checkpoint: str | None = None, extra_files: dict[str, str] | None = None) -> str:
    """Exports `net` (use the EMA network) as `base_path/model_name/<next version>`.

    `settings` default to `ServingSettings.from_config(config)`; `extra_files` maps paths
    inside the version (e.g. under `assets.extra/`) to text written before the version
    appears. Returns the version directory. Raises ValueError for settings out of bounds or
    a bad model name.
    """
    check_model_name(model_name)
    if config.sampling.data_init:
        raise ValueError(
            "the config samples with data_init (starting from held-out images perturbed by "
            "sigma_1), which a SavedModel cannot do: its requests carry seeds, not images. "
            "Pass --nodata_init to export sampling from uniform noise (the paper's setting).")
    settings = settings or ServingSettings.from_config(config)
    module = ServingModule(net, config, step, settings)
    metadata = {"checkpoint": checkpoint, **json.loads(module.settings_json),
                "config": config.to_dict()}
    path = save_version(lambda directory: _write(module, directory, metadata, extra_files or {}),
                        os.path.join(base_path, model_name))
    logging.info("Exported step %d to %s (signatures: %s)", step, path, ", ".join(SIGNATURES))
    return path


def read_metadata(export_dir: str) -> dict[str, Any]:
    """The metadata an export wrote (step, checkpoint, sampler, bounds, config, ...)."""
    with tf.io.gfile.GFile(os.path.join(export_dir, METADATA_FILE)) as f:
        return yaml.safe_load(f)


# ---- CLI ----

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this CLI's flags on `flag_values`."""
    fv = dict(flag_values=flag_values)
    cli.define_model_source_flags(flag_values, "exported")
    flags.DEFINE_string("model_name", "ncsn", "Model name: the directory under --base_path "
                        "and the name clients use in /v1/models/<name>.", **fv)
    flags.DEFINE_string("base_path", "saved_models", "Directory (or gs://, s3:// prefix) that "
                        "holds one directory per model.", **fv)
    flags.DEFINE_integer("n_steps_each", None, "Langevin steps per noise level T of "
                         "serving_default. Default: from the config.", **fv)
    flags.DEFINE_float("step_lr", None, "Langevin step size epsilon of serving_default. "
                       "Default: from the config.", **fv)
    flags.DEFINE_boolean("denoise", None, "Final denoising step in serving_default and "
                         "inpaint. Default: from the config.", **fv)
    flags.DEFINE_enum("sampler", None, list(sampling.SAMPLERS), "Sampler of serving_default "
                      "(and of inpaint, unless it is deterministic: then ald), fixed at export and "
                      "recorded in the metadata. Default: from the config (ald).", **fv)
    flags.DEFINE_integer("num_steps", None, "Noise levels of the cas/pc/heun/dpm sampler. "
                         "Default: from the config (0: the sampler's default).", **fv)
    cli.define_sampler_flags(flag_values, _SAMPLER_SETTINGS, default="from the config")
    flags.adopt_module_key_flags(cli, flag_values=flag_values)  # listed by --help
    flags.DEFINE_integer("max_batch", None, "Most seeds (images) one request may ask for. "
                         "Default: the config's sampling_batch_size.", **fv)
    flags.DEFINE_integer("max_n_steps_each", DEFAULT_MAX_N_STEPS_EACH,
                         "Largest n_steps_each that sample_with_settings accepts.", **fv)
    flags.DEFINE_boolean("data_init", None, "Must be off (--nodata_init) for a model trained "
                         "or configured with data_init: a served model samples from uniform "
                         "noise, since requests carry no held-out images.", **fv)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    from ncsn_tf import checkpoints

    f = flag_values
    try:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        source = cli.model_source(f)
        net, config, step = checkpoints.load(source, ema=not f.no_ema, precision=f.precision)
        config = presets.override(config, **{
            k: f[k].value for k in ("data_init", "sampler", "num_steps", *_SAMPLER_SETTINGS)
            if f[k].value is not None})
        settings = ServingSettings.from_config(
            config, n_steps_each=f.n_steps_each, step_lr=f.step_lr, denoise=f.denoise,
            max_batch=f.max_batch, max_n_steps_each=f.max_n_steps_each)
        path = export(net, config, step, f.base_path, f.model_name, settings=settings,
                      checkpoint=source)
    except (FileNotFoundError, ValueError, app.UsageError) as e:
        sys.exit(f"export: {e}")
    print(path)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
