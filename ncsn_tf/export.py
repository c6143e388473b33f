"""Export a trained model for TF Serving: `python -m ncsn_tf.export`.

    python -m ncsn_tf.export --workdir=runs/cifar10 --base_path=saved_models --model_name=ncsn \
        --sampler=dpm

writes the EMA weights of the workdir's latest checkpoint as the next version
`BASE_PATH/MODEL_NAME/VERSION/` (atomically; see `ncsn_tf.serving`) and prints its path.
`serving_default` samples with the config's sampler and settings, each overridable by the
sampler flags (`--sampler`, `--num_steps`, `--n_steps_each`, ...); they are fixed at export and
recorded in the metadata (the `sampler_settings` signature returns them). `--max_batch` and
`--max_n_steps_each` bound what a request may ask for.
"""
from __future__ import annotations

import sys

from absl import app, flags

from ncsn_tf import cli, serving
from ncsn_tf.config import flags as config_flags
from ncsn_tf.config import presets


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this CLI's flags on `flag_values`."""
    fv = dict(flag_values=flag_values)
    cli.define_model_source_flags(flag_values, "exported")
    flags.DEFINE_string("model_name", "ncsn", "Model name: the directory under --base_path "
                        "and the name clients use in /v1/models/<name>.", **fv)
    flags.DEFINE_string("base_path", "saved_models", "Directory (or gs://, s3:// prefix) that "
                        "holds one directory per model.", **fv)
    cli.define_sampler_flags(flag_values, cli.SAMPLER_FIELDS, default="from the config")
    config_flags.define_field_flag(
        "data_init", "Must be off (--nodata_init) for a model trained or configured with it: a "
        "served model samples from uniform noise, since requests carry no held-out images.",
        flag_values)
    flags.DEFINE_integer("max_batch", None, "Most seeds (images) one request may ask for. "
                         "Default: the config's sampling_batch_size.", **fv)
    flags.DEFINE_integer("max_n_steps_each", serving.DEFAULT_MAX_N_STEPS_EACH,
                         "Largest n_steps_each that sample_with_settings accepts.", **fv)
    for module in (cli, config_flags):  # --help lists the toolkit's flags too
        flags.adopt_module_key_flags(module, flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    from ncsn_tf.training import checkpoints

    f = flag_values
    try:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        source = cli.model_source(f)
        net, config, step = checkpoints.load(source, ema=not f.no_ema, precision=f.precision)
        config = presets.override(config, **{
            k: f[k].value for k in ("data_init", *cli.SAMPLER_FIELDS) if f[k].value is not None})
        limits = serving.ServingLimits(max_batch=f.max_batch,
                                       max_n_steps_each=f.max_n_steps_each)
        path = serving.export(net, config, step, f.base_path, f.model_name, limits=limits,
                              checkpoint=source)
    except (FileNotFoundError, ValueError, app.UsageError) as e:
        sys.exit(f"export: {e}")
    print(path)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
