"""What the command-line tools share: the sampler flags (generated from the config schema)
and refusing a request that cannot fit, before any work."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging

from ncsn_tf import flags as config_flags

# The config fields that choose and tune a sampler: flags of sample, export and evaluate.
SAMPLER_FIELDS = ("sampler", "num_steps", "n_steps_each", "step_lr", "denoise",
                  "corrector_steps", "snr", "rho", "churn", "eta", "s_noise")
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def define_sampler_flags(flag_values: flags.FlagValues, fields=SAMPLER_FIELDS,
                         default: str = "from the checkpoint's config") -> None:
    """One flag per config field in `fields`, with the config's help, type and choices;
    unset (None) keeps the model's own value."""
    for field in fields:
        help_text = f"{config_flags.HELP[field]} Default: {default}."
        kind = config_flags.config_fields()[field][1]
        if field in config_flags.CHOICES:
            flags.DEFINE_enum(field, None, list(config_flags.CHOICES[field]), help_text,
                              flag_values=flag_values)
        else:
            define = {bool: flags.DEFINE_boolean, float: flags.DEFINE_float,
                      int: flags.DEFINE_integer}[kind]
            define(field, None, help_text, flag_values=flag_values)


def run(main: Callable) -> None:
    """`absl.app.run(main)`, except that asking for help exits with status 0 (absl's is 1)
    and log lines read `12:03:04 message` (absl's file:line prefix with --verbosity)."""
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        plain = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
        absl_logging.get_absl_handler().setFormatter(plain)
    try:
        app.run(main)
    except SystemExit as stop:
        if stop.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise


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
