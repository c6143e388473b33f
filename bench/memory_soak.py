"""Host memory and retracing over a long run: `fit` for `--steps` steps, then repeated sampler
calls, watching the resident memory and counting how often the graphs are traced.

    python bench/memory_soak.py --preset digits --batch 64 --steps 1000

Training runs as `fit` does in ncsn_tf.train: epochs of `--steps_per_epoch` steps over a
repeated dataset, so epoch boundaries (new iterators, metric resets) are exercised too. A trace
is counted each time Python runs `train_step` or the sampler's score function, which happens only
while TensorFlow traces a graph. Prints one JSON line: the trace counts (1 and 1 when nothing
retraces), the resident memory after the first epoch and at the end, its growth, and the
least-squares slope of memory over the steps after the first epoch (MiB per 1,000 steps).
"""
from __future__ import annotations

import argparse

import common
import keras
import numpy as np
import tensorflow as tf


class MemoryLog(keras.callbacks.Callback):
    """Records (optimizer step, resident MiB) every `every` training steps."""

    def __init__(self, every: int = 10):
        super().__init__()
        self.every = every
        self.samples: list[tuple[int, float]] = []

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every == 0:
            self.samples.append((step, common.rss_mib()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(parser)
    parser.set_defaults(preset="digits", batch=64)
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--steps_per_epoch", type=int, default=100)
    parser.add_argument("--sampler_calls", type=int, default=20,
                        help="sampler runs after training, alternating two batch sizes")
    args = parser.parse_args(argv)
    if args.steps < 2 * args.steps_per_epoch:
        raise ValueError("--steps must cover at least two epochs (2 * --steps_per_epoch) so "
                         "that memory after the first epoch can be compared with the end")
    config = common.setup(args)
    machine = common.machine()
    from ncsn_tf.sampling import AnnealedLangevin
    from ncsn_tf.training.score_model import ScoreModel

    model = ScoreModel(config)
    traces = {"train_step": 0, "score_fn": 0}
    train_step = model.train_step

    def counted_train_step(data):
        traces["train_step"] += 1
        return train_step(data)

    model.train_step = counted_train_step
    model.compile(jit_compile=args.jit_compile)

    size, channels = config.data.image_size, config.data.channels
    images = tf.random.stateless_uniform([4 * args.batch, size, size, channels], seed=[1, 2])
    dataset = tf.data.Dataset.from_tensor_slices(images).repeat().batch(args.batch,
                                                                         drop_remainder=True)
    memory_log = MemoryLog()
    model.fit(dataset, epochs=args.steps // args.steps_per_epoch,
              steps_per_epoch=args.steps_per_epoch, shuffle=False, verbose=0,
              callbacks=[memory_log])
    samples = memory_log.samples
    steps = np.array([s for s, _ in samples if s > args.steps_per_epoch], np.float64)
    rss = np.array([m for s, m in samples if s > args.steps_per_epoch], np.float64)
    after_first_epoch = next(m for s, m in samples if s >= args.steps_per_epoch)
    slope = float(np.polyfit(steps, rss, 1)[0]) * 1000 if len(steps) > 1 else 0.0

    def score_fn(x, labels):
        traces["score_fn"] += 1
        return model.ema_net(x, labels, training=False)

    sampler = AnnealedLangevin.from_config(score_fn, model.ema_net.sigmas, config,
                                           jit_compile=args.jit_compile)
    sampler_rss = []
    for call in range(args.sampler_calls):
        seeds = tf.range(args.batch if call % 2 == 0 else max(args.batch // 2, 1),
                         dtype=tf.int64)
        sampler.run_levels(sampler.init(seeds), seeds, 0, 1)["samples"].numpy()
        if call == 0:
            traces_after_first_call = traces["score_fn"]
        sampler_rss.append(common.rss_mib())

    record = {
        "bench": "memory_soak", "preset": config.name, "ngf": config.model.ngf,
        "batch": args.batch, "precision": args.precision, "jit_compile": args.jit_compile,
        "steps": int(model.optimizer.iterations.numpy()),
        "train_traces": traces["train_step"],
        "sampler_calls": args.sampler_calls,
        "sampler_traces_first_call": traces_after_first_call if args.sampler_calls else 0,
        "sampler_traces": traces["score_fn"],
        "rss_after_first_epoch_mib": round(after_first_epoch, 1),
        "rss_end_of_training_mib": round(samples[-1][1], 1),
        "rss_growth_mib": round(samples[-1][1] - after_first_epoch, 1),
        "rss_slope_mib_per_1000_steps": round(slope, 2),
        "rss_by_epoch_mib": [round(m, 1) for s, m in samples if s % args.steps_per_epoch == 0],
        "rss_sampler_growth_mib": round(sampler_rss[-1] - sampler_rss[0], 1)
        if sampler_rss else 0.0,
        "peak_rss_mib": round(common.peak_rss_mib(), 1),
        "machine": machine, "load_avg_1m_end": common.load_avg(),
    }
    common.emit(record, args.output)
    return record


if __name__ == "__main__":
    main()
