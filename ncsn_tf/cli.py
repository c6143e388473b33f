"""What the command-line tools share: a quiet console, the sampler flags (generated from the
config schema), the runner, and refusing a request that cannot fit, before any work."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging

from ncsn_tf.config import flags as config_flags

# The config fields that choose and tune a sampler: flags of sample, export and evaluate.
SAMPLER_FIELDS = ("sampler", "num_steps", "n_steps_each", "step_lr", "denoise",
                  "corrector_steps", "snr", "rho", "churn", "eta", "s_noise")
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def verbose(argv: list[str] | None = None) -> bool:
    """Whether the command line asks for absl's and TensorFlow's own log lines."""
    return any(a.startswith(("--verbosity", "-v")) for a in (argv or sys.argv)[1:])


def quiet_tensorflow_boot() -> None:
    """Loads TensorFlow without its boot lines on the console (absl's pre-init notice, oneDNN,
    CPU features: printed by C++ before Python can filter them) and keeps its later C++ and
    Python log lines to errors that stop the run. What the import printed is replayed if it
    fails. `--verbosity` (see `verbose`) skips all of this."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            importlib.import_module("tensorflow")
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def quiet_console_of_a_cli() -> None:
    """Run on `import ncsn_tf`: for `python -m ncsn_tf.NAME` or `python -m pipelines.NAME`
    without --verbosity, `quiet_tensorflow_boot` before the command imports TensorFlow (the
    client does not use it)."""
    argv = sys.orig_argv
    command = argv[argv.index("-m") + 1:] if "-m" in argv else []
    if (command and command[0].startswith(("ncsn_tf.", "pipelines."))
            and command[0] != "ncsn_tf.client" and not verbose(command)):
        quiet_tensorflow_boot()


def define_sampler_flags(flag_values: flags.FlagValues, fields=SAMPLER_FIELDS,
                         default: str = "from the checkpoint's config") -> None:
    """One flag per config field in `fields`, with the config's help, type and choices;
    unset (None) keeps the model's own value."""
    for field in fields:
        config_flags.define_field_flag(field, f"Default: {default}.", flag_values)


def define_model_source_flags(flag_values: flags.FlagValues, used: str,
                              weights: bool = True) -> None:
    """The model to load: `--workdir` (its latest checkpoint) or `--checkpoint`, and with
    `weights` the `--precision` to run it in and `--no_ema` (the live weights). `used` says
    what happens to it, e.g. "sampled"."""
    flags.DEFINE_string("workdir", None, "Training workdir (config.yaml and checkpoints/): its "
                        f"latest checkpoint is {used}.", flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "A checkpoint prefix (e.g. WORKDIR/checkpoints/"
                        "ckpt-5000) instead of --workdir's latest one.", flag_values=flag_values)
    if weights:
        config_flags.define_field_flag("precision", "Default: the one it was trained with.",
                                       flag_values)
        flags.DEFINE_boolean("no_ema", False, "Use the live weights instead of the EMA ones.",
                             flag_values=flag_values)


def model_source(flag_values: flags.FlagValues) -> str:
    """The workdir or checkpoint given by `define_model_source_flags`' flags (exactly one)."""
    if (flag_values.workdir is None) == (flag_values.checkpoint is None):
        raise app.UsageError("Give exactly one of --workdir and --checkpoint.")
    return flag_values.workdir or flag_values.checkpoint


def define_deprecated_aliases(renamed: dict[str, str], flag_values: flags.FlagValues) -> None:
    """`--old` for each `old -> new` in `renamed`: the spelling of an earlier release,
    accepted for one release (`warn_deprecated` says so)."""
    for old, new in renamed.items():
        flags.DEFINE_alias(old, new, flag_values=flag_values)


def warn_deprecated(renamed: dict[str, str], flag_values: flags.FlagValues) -> None:
    for old, new in renamed.items():
        if flag_values[old].present:
            absl_logging.warning("--%s is deprecated; it is --%s now.", old, new)


def run(main: Callable, exit_at_once: bool = False) -> None:
    """`absl.app.run(main)`, except that asking for help exits with status 0 (absl's is 1)
    and the console holds the project's own log lines, as `12:03:04 message`, and the errors
    of the libraries below it (all of their lines, with absl's file:line prefix, with
    --verbosity).

    `exit_at_once`: once `main` has returned (its files written and closed), end the process
    without the interpreter's teardown, in which TensorFlow destroys the tf.data iterators
    still referenced: each waits for its autotuning thread's next wake-up, which took 1 to 38
    seconds after a training run's last line.
    """
    if not verbose():
        handler = absl_logging.get_absl_handler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_own_lines_and_errors)
    try:
        app.run(main)
    except SystemExit as stop:
        if stop.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        if exit_at_once:
            _exit_now(stop.code)
        raise


def _exit_now(code) -> None:
    """`sys.exit(code)` without the interpreter's teardown (atexit, finalizers)."""
    if isinstance(code, str):  # sys.exit("message"): the message on stderr, status 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else int(code))


_OWN_CODE = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + name
                  + os.sep for name in ("ncsn_tf", "pipelines"))


def _own_lines_and_errors(record: logging.LogRecord) -> bool:
    """Keeps this project's log lines and anyone's errors (TensorFlow logs checkpoint sharding
    and tf.data notes through absl too)."""
    return record.levelno >= logging.ERROR or record.pathname.startswith(_OWN_CODE)


def check_memory(num_images: int, bytes_per_image: int, advice: str) -> None:
    """Raises UsageError when `num_images` x `bytes_per_image` (what a request keeps in memory)
    is over half of this machine's memory, saying how much and `advice` (how to split it)."""
    needed = num_images * bytes_per_image
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > total // 2:
        raise app.UsageError(
            f"{num_images:,} images need {needed / 2**30:,.1f} GiB to hold "
            f"({bytes_per_image:,} bytes each), more than half of this machine's "
            f"{total / 2**30:.0f} GiB: {advice}")
