"""Score-evaluation and sampler throughput of an NCSNv2 score network.

    python bench/sampler.py --preset cifar10 --batch 32 --precision fp32|bf16 [--jit_compile]

Prints one JSON line with
- score evaluations: images/s of one `net(x, labels, training=False)` call on a batch (what the
  official benchmark calls score evaluation), its convolution GFLOP per image and GFLOP/s;
- the sampler: `AnnealedLangevin.run_levels` over the first `--levels` noise levels, the same
  graph (one tf.while_loop over all steps) that `sample` runs, as Langevin steps/s and
  images·steps/s, and the time of one step over that of one score evaluation (`--levels 0`
  skips it);
- one step's per-seed noise for the batch: the batched generator the samplers use
  (`sampling.philox`, a constant number of ops) and, for comparison, a `tf.map_fn` of
  `tf.random.stateless_normal` over the seeds (N small ops), each over one score evaluation;
- peak host memory and the same-run 3x3-conv forward ceiling in float32 and bfloat16.
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
    parser.add_argument("--levels", type=int, default=2,
                        help="noise levels the timed sampler run covers (n_steps_each each)")
    args = parser.parse_args(argv)
    config = common.setup(args)
    machine = common.machine()
    from ncsn_tf import models
    from ncsn_tf.sampling import AnnealedLangevin, philox

    if not 0 <= args.levels <= config.model.num_scales:
        raise ValueError(f"--levels must be in [0, {config.model.num_scales}], got {args.levels}")
    net = models.build(config)
    size, channels = config.data.image_size, config.data.channels
    images = tf.random.stateless_uniform([args.batch, size, size, channels], seed=[1, 2])
    labels = tf.zeros([args.batch], tf.int32)

    score = tf.function(lambda x, y: net(x, y, training=False), jit_compile=args.jit_compile)
    score_seconds = common.time_calls(lambda: score(images, labels).numpy(), args.warmup,
                                      args.repeats)
    score_step = statistics.median(score_seconds)
    flops = common.conv_flops(score.get_concrete_function(images, labels).graph)

    seeds = tf.range(args.batch, dtype=tf.int64)
    shape = (size, size, channels)
    noise = {"philox": tf.function(lambda: philox.normal(seeds, 7, shape),
                                   jit_compile=args.jit_compile),
             "map_fn": tf.function(lambda: _map_fn_normal(seeds, 7, shape))}
    noise_s = {name: statistics.median(common.time_calls(lambda: draw().numpy(), args.warmup,
                                                         max(args.repeats, 5)))
               for name, draw in noise.items()}

    record = {
        "bench": "sampler", "preset": config.name, "arch": models.arch_name(config),
        "ngf": config.model.ngf, "params": common.count_params(net), "batch": args.batch,
        "precision": args.precision, "jit_compile": args.jit_compile,
        "score_images_per_s": round(args.batch / score_step, 3),
        "score_s": [round(t, 4) for t in score_seconds],
        "gflop_per_image": round(flops / args.batch / 1e9, 6),
        "gflop_per_s": round(flops / score_step / 1e9, 1),
        # One step's noise for the whole batch, in ms and over one score evaluation.
        **{f"noise_{name}_ms": round(1e3 * t, 3) for name, t in noise_s.items()},
        **{f"noise_{name}_over_score": round(t / score_step, 5) for name, t in noise_s.items()},
    }
    if args.levels:
        sampler = AnnealedLangevin.from_config(lambda x, y: net(x, y, training=False),
                                               net.sigmas, config, jit_compile=args.jit_compile)
        start = sampler.init(seeds)
        run_seconds = common.time_calls(
            lambda: sampler.run_levels(start, seeds, 0, args.levels)["samples"].numpy(),
            min(args.warmup, 1), max(args.repeats // 2, 1))
        run = statistics.median(run_seconds)
        steps = args.levels * config.sampling.n_steps_each
        record.update({
            "sampler_steps": steps,
            "sampler_steps_per_s": round(steps / run, 4),
            "sampler_images_steps_per_s": round(args.batch * steps / run, 3),
            # Time of one Langevin step over that of one score evaluation: 1.0 = no overhead.
            "sampler_step_over_score": round(run / steps / score_step, 3),
            "sampler_s": [round(t, 3) for t in run_seconds]})
    record["peak_rss_mib"] = round(common.peak_rss_mib(), 1)
    return common.finish_throughput(record, args, config, machine, train=False)


def _map_fn_normal(seeds, counter, shape):
    """The per-seed draw as a loop over the batch (what the samplers did before `philox`)."""
    return tf.map_fn(lambda seed: tf.random.stateless_normal(shape, tf.stack([seed, counter]),
                                                             alg="philox"),
                     seeds, fn_output_signature=tf.TensorSpec(shape, tf.float32))


if __name__ == "__main__":
    main()
