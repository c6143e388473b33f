"""Run the NCSNv2 pipeline locally, or compile it for Kubeflow Pipelines / Vertex AI Pipelines.

    python -m pipelines.run --dataset=digits --pipeline_root=runs/pipeline \\
        --serving_base=saved_models --model_name=digits --feature_network=random-test
    python -m pipelines.run --dataset=cifar10 --serving_base=gs://BUCKET/saved_models \\
        --image=REGISTRY/ncsn-tf:TAG --compile=ncsn_pipeline.yaml

Every config flag of `python -m ncsn_tf.train` applies (`--preset`, `--config`, `--n_iters`,
`--batch_size`, `--ngf`, `--num_scales`, …); the data flags go to ExampleGen, the rest to the
Trainer. A local run executes each component in a subprocess of this Python environment
(kfp.local's SubprocessRunner) with KFP's local cache on: re-running with the same inputs
reuses the outputs of every step that finished (kept in PIPELINE_ROOT/.kfp_cache), so a run
that failed late resumes at the failed step. `--compile` writes the pipeline spec instead;
the flags given become the defaults of its parameters.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging as std_logging
import os
import re
import sys
import time
import warnings
from typing import Any

from absl import app, flags, logging

from ncsn_tf.config import flags as config_flags
from pipelines import trainer

# Config fields that ExampleGen takes as its own parameters; the others go to the Trainer.
DATA_PARAMETERS = trainer.DATA_FIELDS


class PipelineFailed(RuntimeError):
    """A component failed; `component` names it and `reason` is its error."""

    def __init__(self, component: str, reason: str, log_path: str | None = None):
        super().__init__(f"component {component} failed: {reason}")
        self.component, self.reason, self.log_path = component, reason, log_path


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """This CLI's flags (the config flags of ncsn_tf.train plus the pipeline's own)."""
    fv = dict(flag_values=flag_values)
    config_flags.define_config_flags(flag_values)
    flags.DEFINE_string("pipeline_root", None, "Directory for the outputs of every step and "
                        "KFP's local cache (local runs).", **fv)
    flags.DEFINE_string("compile", None, "Write the pipeline spec (YAML) for Kubeflow "
                        "Pipelines / Vertex AI Pipelines to this file instead of running.", **fv)
    flags.DEFINE_string("image", None, "Container image the components run in on Kubeflow / "
                        "Vertex AI (build it with pipelines/Dockerfile).", **fv)
    flags.DEFINE_string("serving_base", None, "TF Serving model base path the Pusher writes "
                        "to (default: saved_models).", **fv)
    flags.DEFINE_string("model_name", None, "Model name: the directory under --serving_base "
                        "(default: ncsn).", **fv)
    flags.DEFINE_string("feature_network", None, "Feature network of the FID: tfgan, "
                        "tfgan:PATH, keras, keras:WEIGHTS.h5 or random-test (tests only; not "
                        "Inception). Default: tfgan.", **fv)
    flags.DEFINE_integer("num_eval_samples", None, "Samples drawn for the FID (default: 1000).",
                         lower_bound=2, **fv)
    flags.DEFINE_float("fid_threshold", None, "Bless (and push) a model only if its FID is at "
                       "most this; <= 0: no threshold (default). A model must also be no "
                       "worse than the last pushed one.", **fv)
    flags.DEFINE_integer("max_train_examples", None, "Use at most this many training images "
                         "(default: all).", lower_bound=0, **fv)
    flags.DEFINE_integer("max_eval_examples", None, "Use at most this many held-out images "
                         "(default: all).", lower_bound=0, **fv)
    flags.DEFINE_boolean("use_proposed_noise", None, "Train with sigma_begin, num_scales and "
                         "step_lr proposed by StatisticsGen (Techniques 1, 2, 4) instead of "
                         "the preset's; flags given explicitly still win. Default: true.", **fv)
    flags.DEFINE_boolean("cache", True, "Reuse the outputs of steps already run with the same "
                         "inputs (local runs).", **fv)


def pipeline_arguments(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """The pipeline parameters the flags set (the pipeline's defaults stand for the rest)."""
    f = flag_values
    fields = {}
    if f.config:
        for section, values in config_flags.read_yaml(f.config).items():
            if section != "name":
                fields.update(values)
    fields.update({name: f[name].value for name in config_flags.config_fields()
                   if f[name].value is not None})
    arguments = {}
    for name in DATA_PARAMETERS:
        value = fields.pop(name, None)
        if value is not None:
            arguments[name] = value
    if fields:
        arguments["config_overrides"] = fields
    if f.preset:
        arguments["preset"] = f.preset
    for name in ("image", "serving_base", "model_name", "feature_network", "num_eval_samples",
                 "fid_threshold", "max_train_examples", "max_eval_examples",
                 "use_proposed_noise"):
        if f[name].value is not None:
            arguments[name] = f[name].value
    return arguments


def run_local(arguments: dict[str, Any], pipeline_root: str, *, cache: bool = True,
              console=None) -> dict[str, Any]:
    """Runs the pipeline with kfp.local in this Python environment; returns a summary.

    `console` (default: stdout) gets one line per component; everything the components print
    goes to PIPELINE_ROOT/run-<time>.log. Raises PipelineFailed naming the failed component,
    its error and the log.
    """
    console = console or sys.stdout
    from kfp import local

    from pipelines.pipeline import DISPLAY_NAMES, ncsn_pipeline

    arguments = dict(arguments)
    serving_base = arguments.get("serving_base", "saved_models")
    if "://" not in serving_base:
        arguments["serving_base"] = os.path.abspath(serving_base)
    _make_importable_in_subprocesses()
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=os.path.abspath(pipeline_root), enable_caching=cache)
    os.makedirs(pipeline_root, exist_ok=True)
    log_path = os.path.join(os.path.abspath(pipeline_root),
                            time.strftime("run-%Y%m%d-%H%M%S.log"))
    print(f"Running the pipeline; every component's full output goes to {log_path}",
          file=console, flush=True)
    with open(log_path, "a", encoding="utf-8") as log_file:
        log = _RunLog(log_file, console, DISPLAY_NAMES)
        try:
            with contextlib.redirect_stdout(log), _root_logger_to(log), \
                    warnings.catch_warnings():
                # Noise for this pipeline: its image is a parameter (only used on Kubeflow)
                # and display names only show in a UI.
                warnings.filterwarnings("ignore", "You may be attemping to run a task that "
                                        "uses custom or non-Python base image", RuntimeWarning)
                warnings.filterwarnings("ignore", r".*settings \['display_name'\] have no effect")
                task = ncsn_pipeline(**arguments)
        except RuntimeError as error:
            failed = re.search(r"Inner task failed: '?([\w-]+)", _plain(str(error)))
            if not failed:
                raise
            name = DISPLAY_NAMES.get(failed.group(1), failed.group(1))
            raise PipelineFailed(name, _last_error(log.lines), log_path) from None
    metrics, blessing, pushed = (task.outputs[k] for k in ("metrics", "blessing",
                                                          "pushed_model"))
    version = pushed.metadata.get("version")  # a JSON number: 1.0
    return {"fid": metrics.metadata.get("fid"),
            "inception_score": metrics.metadata.get("inception_score"),
            "network": metrics.metadata.get("network"),
            "blessed": blessing.metadata.get("blessed"),
            "reasons": blessing.metadata.get("reasons"),
            "pushed": pushed.metadata.get("pushed"),
            "version": None if version is None else int(version),
            "path": pushed.metadata.get("path"),
            "pipeline_root": os.path.abspath(pipeline_root)}


@contextlib.contextmanager
def _root_logger_to(stream):
    """Python's root logger writes only to `stream`, at INFO, for the duration: kfp.local logs
    there between tasks (cache hits, the run's start and end)."""
    root = std_logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = [std_logging.StreamHandler(stream)]
    root.setLevel(std_logging.INFO)
    try:
        yield
    finally:
        root.handlers, root.level = handlers, level


def _make_importable_in_subprocesses() -> None:
    """Puts this checkout on PYTHONPATH so the component subprocesses import ncsn_tf and
    pipelines from it (a no-op in effect when the package is installed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


class _RunLog:
    """Takes kfp.local's stream (its executor log, every component's output): writes all of it
    to `log_file` and one line per finished component to `console`
    (`  Trainer     done    212 s  Trainer: trained …`), and keeps the last lines to quote a
    failed component's error."""

    _START = re.compile(r"Executing task '([\w-]+)'")
    _END = re.compile(r"Task '?([\w-]+)'? (?:finished with status (\w+)|cache hit)")

    def __init__(self, log_file, console, display_names: dict[str, str],
                 max_lines: int = 500):
        self.log_file, self.console, self.names = log_file, console, display_names
        self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._partial = ""
        self._started: dict[str, float] = {}
        self._headline: dict[str, str] = {}

    def write(self, text: str) -> int:
        self.log_file.write(_plain(text))
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            self._line(_plain(line))
        return len(text)

    def _line(self, line: str) -> None:
        self.lines.append(line)
        for task, name in self.names.items():
            if line.strip().startswith(f"{name}: "):
                self._headline[task] = line.strip()
        started, ended = self._START.search(line), self._END.search(line)
        if started:
            self._started[started.group(1)] = time.perf_counter()
        elif ended:
            task, status = ended.group(1), ended.group(2)
            if status is None:
                status, seconds = "cached", ""
            else:
                status = "done" if status == "SUCCESS" else status
                began = self._started.get(task, time.perf_counter())
                seconds = f"{time.perf_counter() - began:.0f} s"
            print(f"  {self.names.get(task, task):<14} {status:<7} {seconds:>6}  "
                  f"{self._headline.get(task, '')}", file=self.console, flush=True)

    def flush(self) -> None:
        self.log_file.flush()

    def isatty(self) -> bool:
        return False  # no colours in the log file


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


def _last_error(lines) -> str:
    """The exception of the last Python traceback in `lines` (a step's streamed log)."""
    lines = [_plain(line).rstrip() for line in lines]
    starts = [i for i, line in enumerate(lines) if line.strip() == "Traceback (most recent "
              "call last):"]
    if not starts:
        return "no Python traceback in its log; see the run log"
    indent = len(lines[starts[-1]]) - len(lines[starts[-1]].lstrip())
    message = []
    for line in lines[starts[-1] + 1:]:
        if not message and (not line.strip() or line[indent:indent + 1].isspace()):
            continue  # a frame of the traceback
        if message and (not line.strip() or line.strip().startswith("[KFP Executor")):
            break
        message.append(line[indent:])
    return "\n".join(message) or "see the run log"


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        arguments = pipeline_arguments(f)
        if f.compile:
            from pipelines.pipeline import compile_pipeline

            if "://" not in arguments.get("serving_base", "saved_models"):
                logging.warning("--serving_base is a path inside the container, lost when the "
                                "Pusher's pod ends; pass e.g. gs://BUCKET/saved_models, or "
                                "set serving_base when starting the run.")
            compile_pipeline(f.compile, **arguments)
            print(f"Wrote the pipeline spec to {f.compile}")
            return
        if not f.pipeline_root:
            raise app.UsageError("--pipeline_root is required to run the pipeline locally (or "
                                 "pass --compile=FILE to write the spec for Kubeflow).")
        summary = run_local(arguments, f.pipeline_root, cache=f.cache)
    except (FileNotFoundError, ValueError, app.UsageError) as e:
        sys.exit(f"pipelines.run: {e}")
    except PipelineFailed as e:
        sys.exit(f"pipelines.run: the pipeline stopped at {e.component} (its output is in "
                 f"{e.log_path}):\n{e.reason}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)
