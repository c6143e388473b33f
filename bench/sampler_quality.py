"""Quality against cost of the samplers on a trained digits model.

    python -m ncsn_tf.train --dataset=digits --workdir=runs/digits       # the README quickstart
    python bench/sampler_quality.py --workdir=runs/digits --output bench/results/samplers.jsonl

For each sampler setting below (or `--settings`), `--num_samples` images from the EMA weights
(seeds 0…N−1), scored by `digit_features` (an MLP trained here on the digits training split:
Fréchet distance in its penultimate features against the training images, and the mean
confidence), with the number of score evaluations per image (NFE) and images/s. One JSON line
per setting; a Markdown table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name: config fields of the sampler (ncsn_tf.presets.SamplingConfig).
SETTINGS = {
    "ald": dict(sampler="ald"),  # the paper's: T = 5 on all 49 levels
    "ald T=1": dict(sampler="ald", n_steps_each=1, step_lr=2.45e-5),  # ε of Technique 4, T = 1
    "cas N=24": dict(sampler="cas", num_steps=24, step_lr=5e-5),  # η = 0.5
    "cas N=49": dict(sampler="cas", num_steps=49, step_lr=5e-5),
    "pc N=12": dict(sampler="pc", num_steps=12),
    "pc N=49": dict(sampler="pc", num_steps=49),
    "heun N=6 churn": dict(sampler="heun", num_steps=6, churn=10.0),
    "heun N=12": dict(sampler="heun", num_steps=12),
    "heun N=12 churn": dict(sampler="heun", num_steps=12, churn=10.0),
    "heun N=25 churn": dict(sampler="heun", num_steps=25, churn=10.0),
}


def run(workdir: str, name: str, fields: dict, num_samples: int, judge) -> dict:
    import tensorflow as tf

    from ncsn_tf import checkpoints, images, presets, sampling
    net, config, step = checkpoints.load(workdir)
    config = presets.override(config, **fields)
    sampler = sampling.for_network(net, config)
    batch = config.sampling.sampling_batch_size
    seeds = np.arange(num_samples, dtype=np.int64)
    sampler.sample(seeds[:2])  # trace outside the timing
    start = time.perf_counter()
    out = np.concatenate([images.to_uint8(sampler.sample(seeds[i:i + batch])["samples"]).numpy()
                          for i in range(0, num_samples, batch)])
    seconds = time.perf_counter() - start
    del tf
    return {"setting": name, **fields, "nfe": sampler.nfe(), "num_samples": num_samples,
            "samples_per_s": num_samples / seconds, "step": step, **judge.score(out)}


def table(rows: list[dict]) -> str:
    reference = next((r for r in rows if r["setting"] == "ald"), None)
    lines = ["| sampler | NFE | Fréchet distance | vs ald | confidence | samples/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['frechet_distance'] / reference['frechet_distance']:.2f}×"
                 if reference else "–")
        lines.append(f"| {r['setting']} | {r['nfe']} | {r['frechet_distance']:.2f} | {ratio} | "
                     f"{r['confidence']:.3f} | {r['samples_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained digits workdir")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated names among: {', '.join(SETTINGS)}")
    parser.add_argument("--output", default=None, help="also append the JSON lines here")
    args = parser.parse_args(argv)
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; expected among {list(SETTINGS)}")
    from digit_features import train_judge
    judge = train_judge()
    rows = []
    for name in names:
        row = run(args.workdir, name, SETTINGS[name], args.num_samples, judge)
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
