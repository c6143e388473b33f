"""Shared pieces of the benchmarks: flags, timing, conv FLOP counting, memory, the 3x3-conv
ceiling and the one JSON line every benchmark prints.

FLOPs are those of the convolutions (2 per multiply-add), counted from the traced graph: every
Conv2D / Conv2DBackpropInput / Conv2DBackpropFilter op contributes 2·|output of the forward
conv|·kh·kw·c_in. Elementwise work (norms, ELU, Adam) is not counted, so GFLOP/s is "useful
convolution GFLOP/s", the number that can be held against the 3x3-conv ceiling.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
_COMPUTE_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that pick the model and how it runs: preset, size, precision, XLA, threads."""
    parser.add_argument("--preset", default="cifar10", help="ncsn_tf preset name")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--ngf", type=int, default=None, help="override the preset's ngf")
    parser.add_argument("--num_scales", type=int, default=None,
                        help="override the preset's number of noise levels L")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--jit_compile", action="store_true", help="compile with XLA")
    parser.add_argument("--intra_op_threads", type=int, default=0,
                        help="TensorFlow intra-op threads (0: TensorFlow's default)")
    parser.add_argument("--inter_op_threads", type=int, default=0,
                        help="TensorFlow inter-op threads (0: TensorFlow's default)")
    parser.add_argument("--output", default=None,
                        help="also append the JSON line to this file (e.g. bench/results/x.jsonl)")


def add_timing_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the throughput benchmarks: warm-up, repeats and the conv ceiling."""
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (tracing included)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls; the median is reported")
    parser.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the 3x3-conv ceiling in the same run")


def setup(args: argparse.Namespace):
    """Applies the thread flags (before TensorFlow starts its runtime) and returns the config
    the flags describe."""
    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    from ncsn_tf.config import presets
    values = {"batch_size": args.batch, "precision": args.precision}
    if args.ngf is not None:
        values["ngf"] = args.ngf
    if args.num_scales is not None:
        values["num_scales"] = args.num_scales
    return presets.override(presets.get(args.preset), **values)


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones. `fn` must
    block until its work is done (e.g. return a NumPy value)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def conv_flops(graph: tf.Graph) -> int:
    """Convolution FLOPs of one run of `graph` (forward and backward convolutions whose
    results are used).

    Raises if the graph has calls into other functions, whose convolutions this would miss.
    """
    total = 0
    outputs = {id(t) for t in getattr(graph, "outputs", [])}
    for op in graph.get_operations():
        if op.type in ("PartitionedCall", "StatefulPartitionedCall", "While", "StatelessWhile"):
            raise ValueError(f"conv_flops cannot see inside {op.type} op {op.name!r}; count "
                             "the FLOPs of the function it calls instead")
        if op.type == "Conv2D":
            out, kernel = op.outputs[0].shape, op.inputs[1].shape
        elif op.type == "Conv2DBackpropInput":
            out, kernel = op.inputs[2].shape, op.inputs[1].shape
        elif op.type == "Conv2DBackpropFilter":
            out, kernel = op.inputs[2].shape, op.outputs[0].shape
        else:
            continue
        if not op.outputs[0].consumers() and id(op.outputs[0]) not in outputs:
            continue  # an unused gradient (e.g. of the input image), pruned before running
        if not (out.is_fully_defined() and kernel.is_fully_defined()):
            raise ValueError(f"{op.type} op {op.name!r} has unknown shapes {out}, {kernel}: "
                             "trace with fully defined input shapes")
        total += 2 * out.num_elements() * kernel[0] * kernel[1] * kernel[2]
    return total


def ceiling_layers(image_size: int, ngf: int) -> list[tuple[int, int]]:
    """(resolution, width) of the plain 3x3-conv stacks that stand for an NCSNv2 of this size:
    two convolutions at the input resolution and ngf channels, two at half the resolution and
    2·ngf channels, where NCSNv2 spends most of its FLOPs."""
    return [(image_size, ngf)] * 2 + [(max(image_size // 2, 1), 2 * ngf)] * 2


def conv_ceiling(batch: int, layers: list[tuple[int, int]], precision: str, train: bool,
                 warmup: int = 1, repeats: int = 10) -> float:
    """GFLOP/s of plain 3x3 "same" convolutions (no bias, no activation) in the compute dtype
    of `precision`, one stack per distinct (resolution, width) in `layers`: forward only, or
    with `train` forward plus the input and filter gradients. The best of `repeats` runs: a
    ceiling is what the machine can do when nothing else gets in the way."""
    dtype = _COMPUTE_DTYPES[precision]
    stacks = {}
    for size, width in layers:
        stacks.setdefault((size, width), 0)
        stacks[(size, width)] += 1
    rng = tf.random.Generator.from_seed(0)
    inputs = [tf.cast(rng.normal([batch, size, size, width]), dtype) for size, width in stacks]
    kernels = [[tf.Variable(tf.cast(rng.normal([3, 3, width, width]) / (3.0 * width ** 0.5),
                                    dtype)) for _ in range(depth)]
               for (_, width), depth in stacks.items()]

    def forward():
        total = tf.constant(0.0, tf.float32)
        for x, stack in zip(inputs, kernels):
            for kernel in stack:
                x = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
            total += tf.reduce_sum(tf.cast(x, tf.float32))
        return total

    @tf.function
    def run():
        if not train:
            return forward()
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            total = forward()
        grads = tape.gradient(total, [*inputs, *[k for s in kernels for k in s]])
        return total + tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])

    flops = conv_flops(run.get_concrete_function().graph)
    seconds = min(time_calls(lambda: run().numpy(), warmup, repeats))
    return flops / seconds / 1e9


def ceilings(args: argparse.Namespace, config, train: bool) -> dict[str, float]:
    """The 3x3-conv ceiling in GFLOP/s for float32 and bfloat16 (and float16 when that is the
    benchmarked precision), at the model's batch, resolution and width."""
    if not args.ceiling:
        return {}
    layers = ceiling_layers(config.data.image_size, config.model.ngf)
    precisions = ["fp32", "bf16"] + (["fp16"] if args.precision == "fp16" else [])
    return {p: round(conv_ceiling(args.batch, layers, p, train), 1) for p in precisions}


def finish_throughput(record: dict, args: argparse.Namespace, config, machine: dict,
                      train: bool) -> dict:
    """Completes a throughput record (the same-run ceiling and the share of it reached, the
    machine, the load at the end), prints it and returns it."""
    ceiling = ceilings(args, config, train=train)
    if ceiling:
        record["ceiling_gflop_per_s"] = ceiling
        record["fraction_of_ceiling"] = round(record["gflop_per_s"] / ceiling[args.precision], 3)
    record["machine"] = machine
    record["load_avg_1m_end"] = load_avg()
    emit(record, args.output)
    return record


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS


def rss_mib() -> float:
    """Current resident memory of this process, MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def count_params(model) -> int:
    """Number of trainable weights of a Keras model."""
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))


def load_avg() -> float:
    """The 1-minute load average: above the core count, timings are shared with others."""
    return round(os.getloadavg()[0], 2)


def machine() -> dict:
    """What the numbers were measured on, including how busy the machine was."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": load_avg(),
            "tensorflow": tf.__version__, "python": platform.python_version(),
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            "gpus": len(tf.config.list_physical_devices("GPU"))}


def emit(record: dict, output: str | None = None) -> None:
    """Prints `record` as one JSON line (and appends it to `output` when given)."""
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "a") as f:
            f.write(line + "\n")
