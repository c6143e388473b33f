"""Noise scales for a dataset: `python -m ncsn_tf.configure` (the paper's Techniques 1, 2, 4).

Measure σ1 on the data, then derive γ, L and ε:
    python -m ncsn_tf.configure --dataset=digits
    python -m ncsn_tf.configure --dataset=folder:/data/faces --image_size=64 --channels=3
Or from a known σ1 and the data dimension D = H·W·C:
    python -m ncsn_tf.configure --dim=3072 --sigma_begin=50
    python -m ncsn_tf.configure --image_size=28 --channels=1 --sigma_begin=28 --json
With your own number of levels L (ε is then chosen for that table):
    python -m ncsn_tf.configure --dim=3072 --sigma_begin=50 --num_scales=232
"""
from __future__ import annotations

import dataclasses
import json
import sys

from absl import app, flags

from ncsn_tf import cli, noise
from ncsn_tf.config import presets, schema
from ncsn_tf.config.flags import help_text, resolve_config

# Flags that only make sense when σ1 is measured on a dataset.
_DATASET_ONLY = ("preset", "data_dir", "exact", "max_examples", "block_size", "seed")


def _declared(field: str):
    """The schema's declaration of a config field (its default and range)."""
    return schema.fields()[field][1]


_DEFAULT_SIGMA_END = _declared("sigma_end").default
_DEFAULT_N_STEPS_EACH = _declared("n_steps_each").default


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """This CLI's flags. Defined by `__main__` only, so importing the module defines nothing."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("dataset", None, help_text("dataset") + " Sigma_begin is measured on its "
                        "training split.", **fv)
    flags.DEFINE_enum("preset", None, presets.names(), "Preset giving the data settings for "
                      "--dataset (default: the dataset's own preset, or for folder:/tfrecord: "
                      "data the one matching --image_size).", **fv)
    flags.DEFINE_integer("image_size", None, help_text("image_size") + " Without --dataset, "
                         "gives D with --channels.",
                         lower_bound=_declared("image_size").metadata["min"], **fv)
    flags.DEFINE_integer("channels", None, help_text("channels"), **fv)
    flags.DEFINE_string("data_dir", None, help_text("data_dir"), **fv)
    flags.DEFINE_boolean("exact", False, "Compare every pair of training images (reads the "
                         "data 1 + ceil(N/block_size) times) instead of a random subsample of "
                         "--max_examples when the dataset is larger.", **fv)
    flags.DEFINE_integer("max_examples", None, "Subsample size for sigma_begin on large "
                         "datasets. Default: 20,000, fewer for images so large that these "
                         "would exceed 2 GiB.", lower_bound=2, **fv)
    flags.DEFINE_integer("block_size", 1024, "Examples per block of the pairwise-distance "
                         "computation; memory ~ 2*block_size*D*4 bytes.", lower_bound=1, **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the random subsample.", **fv)
    flags.DEFINE_integer("dim", None, "Data dimension D = height*width*channels, when "
                         "sigma_begin is given instead of measured.", lower_bound=1, **fv)
    flags.DEFINE_float("sigma_begin", None, "Largest noise level sigma_1, when known (with "
                       "--dim or --image_size/--channels).", **fv)
    flags.DEFINE_float("sigma_end", None, "Smallest noise level sigma_L. Default: the preset's "
                       f"with --dataset, else {_DEFAULT_SIGMA_END}.", **fv)
    flags.DEFINE_integer("n_steps_each", None, "Langevin steps per noise level T (Technique 4 "
                         "picks the step size for it). Default: the preset's with --dataset, "
                         f"else {_DEFAULT_N_STEPS_EACH}.",
                         lower_bound=_declared("n_steps_each").metadata["min"], **fv)
    flags.DEFINE_integer("num_scales", None, "Number of noise levels L to use instead of "
                         "Technique 2's; the step size is chosen for that table and the "
                         "variance ratio it achieves is reported.",
                         lower_bound=_declared("num_scales").metadata["min"], **fv)
    flags.DEFINE_boolean("json", False, "Print one JSON object instead of a table.", **fv)


def run(fv: flags.FlagValues) -> str:
    """The report for parsed flags `fv` (a table, or JSON with --json)."""
    channels = _declared("channels").metadata["choices"]
    if fv.channels is not None and fv.channels not in channels:
        raise app.UsageError(f"--channels={fv.channels} must be one of "
                             f"{', '.join(map(str, channels))}")
    if fv.dataset is not None:
        report = _from_dataset(fv)
    else:
        report = _from_dimension(fv)
    return json.dumps(report) if fv.json else _table(report)


def _from_dataset(fv: flags.FlagValues) -> dict:
    for name in ("dim", "sigma_begin"):
        if fv[name].value is not None:
            raise app.UsageError(f"--{name} cannot be combined with --dataset: sigma_begin and "
                                 "D are measured on the data. Drop --dataset to give them.")
    if fv.exact and fv.max_examples is not None:
        raise app.UsageError("--exact compares every example; drop --max_examples.")
    try:
        config = resolve_config(fv.preset, overrides=dict(
            dataset=fv.dataset, image_size=fv.image_size, channels=fv.channels,
            data_dir=fv.data_dir, sigma_end=fv.sigma_end, n_steps_each=fv.n_steps_each))
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    from ncsn_tf import data  # TensorFlow Datasets and friends load only when data is read

    try:
        images = data.load(config, split="train", training=False)
        result = noise.max_pairwise_distance(images, max_examples=fv.max_examples,
                                             exact=fv.exact, block_size=fv.block_size,
                                             seed=fv.seed)
    except ValueError as e:  # missing or unusable data: say so in one line
        raise app.UsageError(str(e)) from e
    rec = _recommend(result.dim, result.distance, config.model.sigma_end,
                     config.sampling.n_steps_each, fv.num_scales)
    size = config.data.image_size
    return dict(dataclasses.asdict(rec), dataset=config.data.dataset,
                shape=[size, size, config.data.channels],
                sigma_begin_source="exact" if result.exact else "subsample",
                sigma_begin_method=f"max pairwise distance, {result.method}",
                num_examples=result.num_examples, dataset_size=result.dataset_size)


def _from_dimension(fv: flags.FlagValues) -> dict:
    given = [f"--{name}" for name in _DATASET_ONLY if fv[name].present]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise app.UsageError(f"{', '.join(given)} {verb} only with --dataset (which measures "
                             "sigma_begin on the data).")
    if fv.dim is not None and (fv.image_size is not None or fv.channels is not None):
        raise app.UsageError("Give the data dimension either as --dim or as --image_size and "
                             "--channels, not both.")
    if fv.dim is None and (fv.image_size is None) != (fv.channels is None):
        raise app.UsageError("--image_size and --channels go together without --dataset "
                             "(D = image_size * image_size * channels); or pass --dim=D.")
    if fv.dim is None and fv.image_size is None:
        raise app.UsageError(
            "Nothing to configure: pass --dataset=NAME to measure sigma_begin on the data, or "
            "--dim=D (or --image_size=N --channels=C) with --sigma_begin=S. "
            "See --helpshort.")
    if fv.sigma_begin is None:
        raise app.UsageError("--sigma_begin is required without --dataset (Technique 1: about "
                             "the largest distance between two training images; "
                             "--dataset=NAME measures it).")
    shape = None if fv.dim is not None else [fv.image_size, fv.image_size, fv.channels]
    dim = fv.dim if shape is None else fv.image_size**2 * fv.channels
    sigma_end = _DEFAULT_SIGMA_END if fv.sigma_end is None else fv.sigma_end
    n_steps_each = _DEFAULT_N_STEPS_EACH if fv.n_steps_each is None else fv.n_steps_each
    rec = _recommend(dim, fv.sigma_begin, sigma_end, n_steps_each, fv.num_scales)
    return dict(dataclasses.asdict(rec), dataset=None, shape=shape, sigma_begin_source="given",
                sigma_begin_method="given (--sigma_begin)", num_examples=None,
                dataset_size=None)


def _recommend(dim: int, sigma_begin: float, sigma_end: float, n_steps_each: int,
               num_scales: int | None) -> noise.Recommendation:
    try:
        return noise.recommend(dim, sigma_begin, sigma_end, n_steps_each, num_scales)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def _table(r: dict) -> str:
    shape = f" ({'x'.join(map(str, r['shape']))})" if r["shape"] else ""
    source = f"{r['dataset']}: " if r["dataset"] else ""
    rows = [
        ("sigma_begin", "σ1", f"{r['sigma_begin']:.6g}",
         f"Technique 1: {source}{r['sigma_begin_method']}"),
        ("sigma_end", "σL", f"{r['sigma_end']:.6g}", ""),
        ("gamma", "γ", f"{r['gamma']:.6g}", f"Technique 2 for D = {r['dim']:,}{shape}"),
        ("num_scales", "L", str(r["num_scales"]),
         (f"Technique 2: geometric table with ratio {r['sigma_ratio']:.6g}"
          if r["num_scales"] == r["technique2_num_scales"] else
          f"given (--num_scales); ratio {r['sigma_ratio']:.6g}; Technique 2 gives "
          f"{r['technique2_num_scales']}")),
        ("n_steps_each", "T", str(r["n_steps_each"]), ""),
        ("step_lr", "ε", f"{r['step_lr']:.3g}",
         f"Technique 4: variance ratio {r['variance_ratio']:.4f} (Eq. 6, ideal 1)"),
    ]
    width = max(len(name) for name, *_ in rows)
    lines = [f"Noise scales for D = {r['dim']:,}{shape}"]
    lines += [f"  {name:<{width}}  {symbol:<2} {value:<12} {note}".rstrip()
              for name, symbol, value, note in rows]
    lines += ["", "Flags for training and sampling:",
              f"  --sigma_begin={r['sigma_begin']:.6g} --sigma_end={r['sigma_end']:.6g} "
              f"--num_scales={r['num_scales']} --n_steps_each={r['n_steps_each']} "
              f"--step_lr={r['step_lr']:.3g}"]
    return "\n".join(lines)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    try:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        print(run(flag_values))
    except app.UsageError as e:  # a one-line error, not the whole --help
        sys.exit(f"configure: {e}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
