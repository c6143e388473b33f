"""Does mixed precision train like float32? Same start, same batches, same steps, then the DSM
loss on a fixed evaluation batch.

    python bench/precision_check.py --preset digits --steps 100 --precisions fp32,bf16,fp16

Every precision starts from the same float32 initial weights and trains on the same batches
(the preset's training pipeline, deterministic); the evaluation batch is the first batch of the
evaluation split with fixed noise levels and noise. Prints one JSON line with each precision's
loss before and after training and its relative difference to float32 (`rel_diff`); issue 7
asks for |rel_diff| <= 2% for bf16. fp16 uses dynamic loss scaling (its first steps may be
skipped while the scale settles; `applied_steps` says how many were not).
"""
from __future__ import annotations

import argparse

import common
import keras
import numpy as np
import tensorflow as tf


def evaluation_loss(net, images: tf.Tensor, labels: tf.Tensor, noise: tf.Tensor,
                    anneal_power: float) -> float:
    """Mean annealed DSM loss of `net` (inference mode) on a fixed batch."""
    from ncsn_tf.training.losses import dsm_loss
    per_example = dsm_loss(lambda y, i: net(y, i, training=False), images, net.sigmas, labels,
                           noise, anneal_power)
    return float(tf.reduce_mean(per_example))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(parser)
    parser.set_defaults(preset="digits", batch=64)
    parser.add_argument("--steps", type=int, default=100, help="training steps per precision")
    parser.add_argument("--lr", type=float, default=None, help="override the preset's lr")
    parser.add_argument("--eval_batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="comma-separated; the first one is the reference")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    unknown = sorted(set(precisions) - set(common.PRECISIONS))
    if unknown:
        raise ValueError(f"Unknown precisions {unknown}; expected some of {common.PRECISIONS}")
    config = common.setup(args)
    machine = common.machine()
    from ncsn_tf import data
    from ncsn_tf.config import presets
    from ncsn_tf.training.score_model import ScoreModel

    if args.lr is not None:
        config = presets.override(config, lr=args.lr)

    train = data.load(config, "train", batch_size=args.batch, deterministic=True)
    batches = [b for b in train.take(args.steps)]
    evaluation = data.load(config, data.eval_split(config), training=False,
                           batch_size=args.eval_batch)
    eval_images = next(iter(evaluation))
    n = int(eval_images.shape[0])
    labels = tf.random.stateless_uniform([n], [7, 0], 0, config.model.num_scales, tf.int32)
    noise = tf.random.stateless_normal(eval_images.shape, [7, 1])

    keras.utils.set_random_seed(args.seed)
    initial_weights = None
    record = {"bench": "precision_check", "preset": config.name, "ngf": config.model.ngf,
              "batch": args.batch, "steps": args.steps, "lr": config.optim.lr,
              "eval_batch": n, "seed": args.seed, "precisions": {}}
    for precision in precisions:
        model = ScoreModel(presets.override(config, precision=precision))
        if initial_weights is None:
            initial_weights = model.net.get_weights()
        model.net.set_weights(initial_weights)
        model.ema_net.set_weights(initial_weights)
        model.compile(jit_compile=args.jit_compile)
        power = config.training.anneal_power
        before = evaluation_loss(model.net, eval_images, labels, noise, power)
        skipped = 0
        for batch in batches:
            logs = model.train_on_batch(batch, return_dict=True)
            skipped += not np.isfinite(logs["grad_norm"]) or logs["grad_norm"] == 0.0
        after = evaluation_loss(model.net, eval_images, labels, noise, power)
        record["precisions"][precision] = {"loss_before": round(before, 4),
                                           "loss_after": round(after, 4),
                                           "applied_steps": args.steps - int(skipped)}
    reference = record["precisions"][precisions[0]]["loss_after"]
    for result in record["precisions"].values():
        result["rel_diff"] = round(result["loss_after"] / reference - 1.0, 5)
    record["machine"] = machine
    common.emit(record, args.output)
    return record


if __name__ == "__main__":
    main()
