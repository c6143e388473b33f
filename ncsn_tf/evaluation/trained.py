"""Samples drawn on the fly from a trained model (a checkpoint's EMA network or an exported
SavedModel) and their FID/IS; image i comes from seed `seed + i`, as in ncsn_tf.sample and TF
Serving."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf

from ncsn_tf import data, serving, images as image_io, sampling
from ncsn_tf.training import checkpoints
from ncsn_tf.config import presets, schema
from ncsn_tf.evaluation.fid import ManifoldMetrics, Statistics, compute_fid_is, log_progress
from ncsn_tf.evaluation.inception import FeatureNetwork
from ncsn_tf.progress import Progress

# int64 seeds [n] -> uint8 images [n, H, W, C], one image per seed.
SampleFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class TrainedModel:
    """A trained model to draw samples from, with what the results should record about it."""
    sample_fn: SampleFn
    config: presets.Config  # its training config (dataset of the reference statistics)
    step: int
    source: str  # checkpoint prefix, workdir or SavedModel directory
    sampler: dict[str, Any]  # n_steps_each, step_lr, denoise, num_scales
    net: Any = None  # a checkpoint's network: weights assigned to it are what gets sampled


def checkpoint_sample_fn(net, config: presets.Config) -> SampleFn:
    """The sampler of `config.sampling` (ald by default; cas, pc, heun, dpm) on `net` (pass the EMA
    network).

    With `data_init` (as the official FID mode allows), the image of seed s starts from
    held-out image s (mod the split's size) perturbed by σ1, instead of uniform noise. The
    sampler is traced once; it reads `net`'s variables, so weights assigned to `net`
    afterwards (the next checkpoint of a sweep) are sampled without retracing.
    """
    sampler = sampling.for_network(net, config)
    starts = data.HeldOutImages(config) if config.sampling.data_init else None

    def sample_fn(seeds):
        init = None if starts is None else starts(seeds)
        return image_io.to_uint8(sampler.sample(seeds, init)["samples"]).numpy()

    return sample_fn


def load_checkpoint_model(path: str, config_overrides: dict[str, Any] | None = None
                          ) -> TrainedModel:
    """The EMA network of a workdir (its latest checkpoint) or checkpoint prefix.

    `config_overrides`: flat config fields to change (None values are ignored), e.g. the
    `sampler`, `num_steps`, `n_steps_each`, `step_lr`, `denoise`, or `precision` (the
    network is built in that precision). The recorded settings include the sampler's NFE.
    """
    overrides = {k: v for k, v in (config_overrides or {}).items() if v is not None}
    net, config, step = checkpoints.load(path, ema=True, precision=overrides.get("precision"))
    config = presets.override(config, **overrides)
    schema.validate(config)
    sample_fn = checkpoint_sample_fn(net, config)
    settings = {**_sampler_settings(config), "nfe": sampling.for_network(net, config).nfe()}
    return TrainedModel(sample_fn, config, step, path, settings, net)


def load_saved_model(export_dir: str, *, n_steps_each: int | None = None,
                     step_lr: float | None = None, denoise: bool | None = None) -> TrainedModel:
    """A SavedModel of `ncsn_tf.serving.export`, sampled through `serving_default` or, when any
    sampler setting is given, `sample_with_settings` (the others from the export).

    Calls are split to respect the export's `max_batch`.
    """
    if not tf.io.gfile.exists(os.path.join(export_dir, serving.METADATA_FILE)):
        raise FileNotFoundError(f"{export_dir} has no {serving.METADATA_FILE}: expected a "
                                "version directory written by `python -m ncsn_tf.export` "
                                "(e.g. saved_models/ncsn/1).")
    metadata = serving.read_metadata(export_dir)
    loaded = tf.saved_model.load(export_dir)
    settings = dict(metadata["sampler"])
    given = dict(n_steps_each=n_steps_each, step_lr=step_lr, denoise=denoise)
    if any(v is not None for v in given.values()):
        settings.update({k: v for k, v in given.items() if v is not None})
        signature = "sample_with_settings"
        arguments = dict(n_steps_each=tf.constant(settings["n_steps_each"], tf.int32),
                         step_lr=tf.constant(settings["step_lr"], tf.float32),
                         denoise=tf.constant(settings["denoise"], tf.bool))
    else:
        signature, arguments = "serving_default", {}
    max_batch = int(metadata["bounds"]["max_batch"])

    def sample_fn(seeds):
        run = loaded.signatures[signature]  # via `loaded`, which owns the variables
        return np.concatenate([
            run(seed=tf.constant(seeds[i:i + max_batch], tf.int64), **arguments)["images"]
            .numpy() for i in range(0, len(seeds), max_batch)])

    settings["num_scales"] = int(metadata["num_levels"])
    return TrainedModel(sample_fn, presets.Config.from_dict(metadata["config"]),
                 int(metadata["step"]), export_dir, settings)


def _sampler_settings(config: presets.Config) -> dict[str, Any]:
    s = config.sampling
    return dict(sampler=s.sampler, **sampling.settings(config), denoise=s.denoise,
                num_scales=config.model.num_scales, data_init=s.data_init)


def generate_samples(sample_fn: SampleFn, num_samples: int, batch_size: int, *,
                     seed: int = 0) -> Iterator[np.ndarray]:
    """uint8 batches of `num_samples` images, image i from seed `seed + i`, logging progress
    (images/s, time left)."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch size ({batch_size}) must be "
                         ">= 1.")
    progress = Progress(total=num_samples)
    for start in range(seed, seed + num_samples, batch_size):
        seeds = np.arange(start, min(start + batch_size, seed + num_samples), dtype=np.int64)
        images = sample_fn(seeds)
        progress.advance(len(images))
        log_progress("generating", progress)
        yield images


def model_fid_is(model: TrainedModel, feature_net: FeatureNetwork,
                 ref_stats: Statistics | str, *, num_samples: int,
                 batch_size: int | None = None, seed: int = 0, eval_batch_size: int = 250,
                 splits: int = 10, keep: list[np.ndarray] | None = None,
                 keep_images: int | None = None, manifold: ManifoldMetrics | None = None
                 ) -> dict[str, Any]:
    """FID and IS (`compute_fid_is`) of `num_samples` images drawn from `model`.

    `batch_size` defaults to the model config's `sampling_batch_size`. The generated batches
    are appended to `keep` when given (at most `keep_images` images; None: all), e.g. to
    save them or to look for their nearest neighbours. `manifold` adds precision, recall,
    KID and the least realistic samples (`compute_fid_is`).
    """
    batches = generate_samples(model.sample_fn, num_samples,
                               batch_size or model.config.sampling.sampling_batch_size,
                               seed=seed)
    if keep is not None:
        batches = _kept(batches, keep, keep_images)
    result = compute_fid_is(_split(batches, eval_batch_size), feature_net, ref_stats,
                            splits=splits, manifold=manifold)
    result["model"] = {"source": model.source, "step": model.step, "seed": seed,
                       **model.sampler}
    return result


def _split(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The batches cut into pieces of at most `size` images (for the feature network)."""
    for batch in batches:
        for start in range(0, len(batch), size):
            yield batch[start:start + size]


def _kept(batches: Iterable[np.ndarray], keep: list[np.ndarray],
          limit: int | None) -> Iterator[np.ndarray]:
    count = 0
    for batch in batches:
        if limit is None or count < limit:
            keep.append(batch if limit is None else batch[:limit - count])
            count += len(keep[-1])
        yield batch
