"""Training throughput of `ScoreModel`: one DSM step (forward, backward, Adam, EMA) per call.

    python bench/train_step.py --preset cifar10 --batch 32 --precision fp32|bf16 [--jit_compile]

Prints one JSON line: images/s (median of `--repeats` steps after `--warmup`), the convolution
GFLOP per image of a training step (forward + both gradients, counted from the traced graph),
the GFLOP/s that makes, peak host memory, and the same-run 3x3-conv training ceiling in float32
and bfloat16. Steps run through Keras' own train function (`train_on_batch`), as `fit` runs them.
"""
from __future__ import annotations

import argparse
import statistics

import common
import tensorflow as tf


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(parser)
    common.add_timing_flags(parser)
    args = parser.parse_args(argv)
    config = common.setup(args)
    machine = common.machine()
    from ncsn_tf import models
    from ncsn_tf.training.score_model import ScoreModel

    model = ScoreModel(config)
    model.compile(jit_compile=args.jit_compile)
    size, channels = config.data.image_size, config.data.channels
    images = tf.random.stateless_uniform([args.batch, size, size, channels], seed=[1, 2])

    seconds = common.time_calls(lambda: model.train_on_batch(images, return_dict=True),
                                args.warmup, args.repeats)
    peak_rss = common.peak_rss_mib()
    graph = tf.function(model.train_step).get_concrete_function(
        tf.TensorSpec(images.shape, images.dtype)).graph
    flops = common.conv_flops(graph)
    step = statistics.median(seconds)
    record = {
        "bench": "train_step", "preset": config.name, "arch": models.arch_name(config),
        "ngf": config.model.ngf, "params": common.count_params(model.net),
        "batch": args.batch, "precision": args.precision, "jit_compile": args.jit_compile,
        "images_per_s": round(args.batch / step, 3),
        "step_s": [round(t, 4) for t in seconds],
        "gflop_per_image": round(flops / args.batch / 1e9, 6),
        "gflop_per_s": round(flops / step / 1e9, 1),
        "peak_rss_mib": round(peak_rss, 1),
    }
    return common.finish_throughput(record, args, config, machine, train=True)


if __name__ == "__main__":
    main()
