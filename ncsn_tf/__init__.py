"""ncsn_tf: NCSNv2 score-based generative models in TensorFlow/Keras 3."""
import sys as _sys

__version__ = "0.1.0"

if "-m" in _sys.orig_argv:  # `python -m ncsn_tf.NAME`: TensorFlow's boot lines stay quiet
    from ncsn_tf import cli as _cli

    _cli.quiet_console_of_a_cli()
