"""Train NCSNv2: `python -m ncsn_tf.train --dataset=celeb_a --workdir=runs/celeba`.

The config comes from a preset (that of --dataset, or --preset), an optional YAML file
(--config) and per-field flags, in that order of precedence (see `ncsn_tf.config.flags`).
Re-running the same command resumes from the workdir's latest checkpoint; `--workdir=DIR`
alone resumes with the config saved there. `--init_from=CHECKPOINT_OR_WORKDIR` starts a new
run from the weights of another (e.g. converted official) checkpoint: fine-tuning.
`--mode=test` evaluates every checkpoint on the held-out split.

Exit status: 0 when done; 1 on bad flags or config, or a diverged (non-finite) loss, with a
message saying what to change; 128 + signal number when stopped by SIGTERM/SIGINT after
saving a checkpoint (143 for SIGTERM), so that schedulers retry preempted jobs.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from ncsn_tf import cli
from ncsn_tf.config import flags as config_flags, schema


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this CLI's flags (the config flags included) on `flag_values`."""
    fv = dict(flag_values=flag_values)
    config_flags.define_config_flags(flag_values)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs, samples "
                        "and the resolved config.yaml; re-running resumes from it.",
                        required=True, **fv)
    flags.DEFINE_enum("mode", "train", ["train", "test"], "train: train or resume. test: the "
                      "EMA weights' DSM loss of every checkpoint on the held-out split, to "
                      "WORKDIR/test_losses.csv and TensorBoard.", **fv)
    config_flags.define_option_flags(schema.RunOptions, flag_values)
    flags.adopt_module_key_flags(config_flags, **fv)  # --help lists the config flags too
    flags.DEFINE_integer("test_batches", 0, "--mode=test: batches per checkpoint (0: the "
                         "whole held-out split).", lower_bound=0, **fv)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
    f = flag_values
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # TensorFlow starts here, after parsing.
    import tensorflow as tf

    from ncsn_tf import data, training
    from ncsn_tf.training import callbacks, checkpoints, workdir_lock

    config = _config(f, checkpoints, data)  # bad flags fail here, before any heavy work
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op runs.
    strategy = training.create_strategy(f.strategy, f.tpu)
    try:
        if f.mode == "test":
            training.evaluate_checkpoints(config, f.workdir, strategy,
                                          max_batches=f.test_batches or None)
            return 0
        options = config_flags.options_from_flags(schema.RunOptions, f)
        result = training.train(config, f.workdir, options, strategy)
    except (training.RunConfigError, data.MissingDataError, checkpoints.CheckpointError,
            workdir_lock.WorkdirLockedError, FileNotFoundError) as error:
        sys.exit(f"ncsn_tf.train: {error}")
    except callbacks.NonFiniteLossError as error:
        logging.error("%s", error)
        return 1
    except tf.errors.OpError as error:
        message = data.bad_data_message(error)
        if message is None:
            raise
        sys.exit(f"ncsn_tf.train: {message} The checkpoints written so far are intact; the "
                 "run resumes from the latest.")
    if result.stop_signal is not None:
        return 128 + result.stop_signal
    logging.info("Done: step %d in %s", result.step, f.workdir)
    return 0


def _config(f: flags.FlagValues, checkpoints, data):
    """Flags -> config; a bare `--workdir=DIR` (plus overrides) resumes DIR's saved config."""
    from tensorflow import io

    if io.gfile.exists(f.workdir) and not io.gfile.isdir(f.workdir):
        sys.exit(f"ncsn_tf.train: --workdir={f.workdir} is a file, not a directory; pass a "
                 "new or existing run directory")
    given = any(f[name].present for name in ("preset", "config", "dataset", "image_size"))
    if not given and checkpoints.read_config(f.workdir, missing_ok=True) is not None:
        f.config = checkpoints.config_path(f.workdir)
        logging.info("Using the config saved in %s", f.config)
    try:
        config = config_flags.config_from_flags(f)
        data.check_dataset(config.data.dataset)
        return config
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"ncsn_tf.train: {error}")


if __name__ == "__main__":
    define_flags()
    cli.run(main, exit_at_once=True)
