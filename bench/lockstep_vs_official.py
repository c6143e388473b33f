"""Stage-by-stage equality with the official code: both sides fed the same numbers.

    python bench/lockstep_vs_official.py --official=/path/to/ncsnv2 [--steps 150]
        [--weights runs/quality_vs_official/official_seed0/ema_weights.npz]

Sample quality compares whole runs, whose random draws differ; this isolates the code.
Prints one JSON line per stage:
- `train`: the official trainer (NCSNv2, `anneal_dsm_score_estimation`, torch Adam,
  `EMAHelper`) and ncsn_tf's `ScoreModel.train_step`, from the same initial weights on the same
  batches, noise levels and noise, for `--steps` steps: the relative L2 distance between the
  two runs' weights and their losses. The yardstick is the distance between two official runs
  whose initial weights differ by 1e-7 (relative): float32 round-off grows the same way, so
  equal code gives distances of the same size and a real difference gives larger ones.
- `sample`: the official `anneal_Langevin_dynamics` and ncsn_tf's `AnnealedLangevin.sample`
  on the same weights (`--weights` in the official layout, else the initial weights) from
  the same initial state with the same noise (ncsn_tf's per-seed draws, handed to torch):
  the largest difference of the samples in [0, 1].
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_vs_official as qvo  # noqa: E402  (bench/ is not a package)

CONTROL_PERTURBATION = 1e-7


def _flat(weights: dict) -> np.ndarray:
    """All trainable weights in the official layout as one vector (σ table excluded)."""
    return np.concatenate([weights[k].ravel() for k in sorted(weights) if k != "sigmas"])


def _official_net(official, ns, weights: dict):
    import torch
    net = official.NCSNv2(ns)
    net.load_state_dict({k: torch.from_numpy(np.asarray(weights[k])) for k in net.state_dict()})
    return net


def _torch_state(net) -> dict:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def train(official, ns, config, steps: int) -> dict:
    """Both trainers in lockstep; the official code draws its noise by `torch.randn_like`,
    which is handed each step's shared noise."""
    import tensorflow as tf
    import torch
    from digit_judge import digits_split
    from ncsn_tf import convert, models
    from ncsn_tf.training.score_model import ScoreModel

    torch.manual_seed(0)
    initial = _torch_state(official.NCSNv2(ns))
    rng = np.random.default_rng(0)
    jitter = {k: (v * (1 + CONTROL_PERTURBATION * rng.standard_normal(v.shape))).astype(v.dtype)
              if v.dtype == np.float32 else v for k, v in initial.items()}
    sides = {}
    for name, weights in (("official", initial), ("control", jitter)):
        net = _official_net(official, ns, weights)
        ema = official.EMAHelper(mu=ns.model.ema_rate)
        ema.register(net)
        sides[name] = (net, official.get_optimizer(ns, net.parameters()), ema)
    nets = [models.build(config) for _ in range(2)]
    for net in nets:
        net(tf.zeros([1, ns.data.image_size, ns.data.image_size, ns.data.channels]),
            tf.zeros([1], tf.int32))
        convert.assign_official_weights(net, {k: initial[k] for k in
                                              (*convert.official_weight_map(net), "sigmas")})
    model = ScoreModel(config, *nets)
    model.compile()
    batch = ns.training.batch_size
    labels = tf.Variable(tf.zeros([batch], tf.int32))
    noise = tf.Variable(tf.zeros([batch, ns.data.image_size, ns.data.image_size,
                                  ns.data.channels]))
    model._perturbation = lambda x, seed: (labels.read_value(), noise.read_value(), batch)
    train_step = tf.function(model.train_step)

    images, _ = digits_split("train")
    sigmas = official.get_sigmas(ns)
    randn_like = torch.randn_like
    losses = {"official": [], "control": [], "ncsn_tf": []}
    mean_before = 0.0
    try:
        for step in range(steps):
            x = images[rng.choice(len(images), batch, replace=False)]
            labels.assign(rng.integers(0, len(sigmas), batch).astype(np.int32))
            noise.assign(rng.standard_normal(x.shape).astype(np.float32))
            shared = torch.from_numpy(noise.numpy().transpose(0, 3, 1, 2).copy())
            torch.randn_like = lambda t: shared.clone()
            x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            for name, (net, optimizer, ema) in sides.items():
                net.train()
                loss = official.dsm(net, x_torch, sigmas,
                                    torch.from_numpy(labels.numpy().astype(np.int64)),
                                    ns.training.anneal_power)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ema.update(net)
                losses[name].append(loss.item())
            # Keras' loss metric is a running mean: recover this step's loss from it.
            mean = float(train_step(tf.constant(x))["loss"])
            losses["ncsn_tf"].append(mean * (step + 1) - mean_before * step)
            mean_before = mean
    finally:
        torch.randn_like = randn_like

    reference = _flat(_torch_state(sides["official"][0]))
    ours = _flat({k: (v.numpy().transpose(3, 2, 0, 1) if len(v.shape) == 4 else v.numpy())
                  for k, v in convert.official_weight_map(nets[0]).items()})
    control = _flat(_torch_state(sides["control"][0]))
    scale = np.linalg.norm(reference)
    return {"stage": "train", "steps": steps,
            "weights_rel_l2_ncsn_tf_vs_official": float(np.linalg.norm(ours - reference) / scale),
            "weights_rel_l2_control_vs_official":
                float(np.linalg.norm(control - reference) / scale),
            "last_loss": {k: round(v[-1], 4) for k, v in losses.items()},
            "max_abs_loss_diff_ncsn_tf": float(np.max(np.abs(
                np.subtract(losses["ncsn_tf"], losses["official"])))),
            "max_abs_loss_diff_control": float(np.max(np.abs(
                np.subtract(losses["control"], losses["official"]))))}


def sample(official, ns, config, weights_path: str | None, num_samples: int) -> dict:
    """Official ALD on ncsn_tf's draws (its `torch.randn_like` returns them in order)."""
    import tensorflow as tf
    import torch
    from ncsn_tf import convert, models
    from ncsn_tf.sampling import AnnealedLangevin, philox
    from ncsn_tf.sampling.driver import _LANGEVIN, INIT, per_seed

    if weights_path:
        weights = dict(np.load(weights_path))
    else:
        torch.manual_seed(0)
        weights = _torch_state(official.NCSNv2(ns))
    torch_net = _official_net(official, ns, weights)
    torch_net.eval()
    net = models.build(config)
    net(tf.zeros([1, ns.data.image_size, ns.data.image_size, ns.data.channels]),
        tf.zeros([1], tf.int32))
    convert.assign_official_weights(net, {k: weights[k] for k in
                                          (*convert.official_weight_map(net), "sigmas")})
    sampler = AnnealedLangevin.from_config(lambda x, y: net(x, y, training=False),
                                           net.sigmas, config)
    seeds = tf.range(num_samples, dtype=tf.int64)
    ours = sampler.sample(seeds)["samples"].numpy()

    shape = sampler.shape
    steps = iter(range(sampler.num_levels * config.sampling.n_steps_each))
    randn_like = torch.randn_like
    torch.randn_like = lambda t: torch.from_numpy(
        per_seed(philox.normal, seeds, _LANGEVIN, shape, next(steps)).numpy()
        .transpose(0, 3, 1, 2).copy())
    try:
        init = per_seed(philox.uniform, seeds, INIT, shape).numpy().transpose(0, 3, 1, 2)
        theirs = official.langevin(torch.from_numpy(init.copy()), torch_net,
                                   torch_net.sigmas.numpy(), config.sampling.n_steps_each,
                                   config.sampling.step_lr, final_only=True,
                                   denoise=config.sampling.denoise)[-1]
    finally:
        torch.randn_like = randn_like
    theirs = theirs.clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    return {"stage": "sample", "num_samples": num_samples, "weights": weights_path or "initial",
            "nfe": sampler.nfe(), "max_abs_diff": float(np.abs(ours - theirs).max()),
            "mean_abs_diff": float(np.abs(ours - theirs).mean())}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True,
                        help="path of a checkout of ermongroup/ncsnv2 (needs torch)")
    parser.add_argument("--steps", type=int, default=150, help="training steps in lockstep")
    parser.add_argument("--weights", help="weights in the official layout to sample with "
                        "(e.g. quality_vs_official.py's ema_weights.npz); default: initial")
    parser.add_argument("--num_samples", type=int, default=16, help="samples to compare")
    parser.add_argument("--stages", default="train,sample", help="comma-separated stages")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - {"train", "sample"})
    if unknown:
        raise SystemExit(f"unknown stage(s) {', '.join(unknown)}: use train and/or sample")
    official = qvo._import_official(args.official)
    config = qvo._digits_config()
    ns = qvo._official_namespace(config)
    records = []
    for stage in stages:
        if stage == "train":
            record = train(official, ns, config, args.steps)
        else:
            record = sample(official, ns, config, args.weights, args.num_samples)
        records.append(record)
        print(json.dumps(record), flush=True)
    return records

if __name__ == "__main__":
    main()
