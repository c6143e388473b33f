"""A second opinion on the official comparison: the same sample files rescored by another judge.

    python bench/judge_agreement.py --out=runs/q --seeds=0,1,2,3,4 [--judge_seed=1]

Scores the own-sampler runs of `quality_vs_official.py` (files in `--out`, its held-out
losses reused) with a digits-only classifier (`digit_judge.train_judge(broken_class=False)`,
the same network without the "not a digit" class, so a feature space of its own) and prints
the same summary: a gap that only one judge sees is a property of that judge.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digit_judge  # noqa: E402
import quality_vs_official  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the --out folder of quality_vs_official")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--judge_seed", type=int, default=0)
    args = parser.parse_args(argv)
    judge = digit_judge.train_judge(seed=args.judge_seed, broken_class=False)
    rows = []
    for side in quality_vs_official.SIDES:
        for seed in (int(s) for s in args.seeds.split(",")):
            run = os.path.join(args.out, f"{side}_seed{seed}")
            with open(os.path.join(run, "facts.json")) as f:
                facts = json.load(f)
            images = np.load(os.path.join(run, f"samples_{side}.npz"))["samples"]
            rows.append({"trained_by": side, "sampled_by": side, "seed": seed, **facts,
                         **judge.score(images, bootstrap=0)})
    print(f"digits-only judge (seed {args.judge_seed}): test accuracy "
          f"{judge.test_accuracy:.3f}")
    print(quality_vs_official._summary(rows))


if __name__ == "__main__":
    main()
