"""Calibrates the digit judge on cases with a known answer; writes the result as JSON.

    python bench/judge_calibration.py --samples=runs/q/ncsn_tf_seed0/ald.npz \
        --output=bench/results/judge_calibration.json

- determinism: the judge trained twice gives the same weights;
- the floor: the held-out digits against the training digits (what real images score);
- outliers it was never trained on (`digit_judge.UNSEEN_KINDS`: salt-and-pepper noise,
  stripes, saturated blobs) mixed at `--fractions` into a base set (`--samples`, e.g. ALD
  samples; default the held-out digits): each mix must be reported broken at the mixed
  fraction, and precision must fall to (1 − f) × the base's precision.
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


def mix(base: np.ndarray, broken: np.ndarray, fraction: float) -> np.ndarray:
    """`base` with its last round(f·N) images replaced by broken ones (N stays the same)."""
    n = int(round(fraction * len(base)))
    return np.concatenate([base[:len(base) - n], broken[:n]]), n / len(base)


def calibrate(base: np.ndarray, fractions: list[float], bootstrap: int) -> dict:
    judge = digit_judge.train_judge()
    again = digit_judge.train_judge()
    deterministic = all(np.array_equal(a, b) for a, b in
                        zip(judge.network.get_weights(), again.network.get_weights()))
    held_out, _ = digit_judge.digits_split("test")
    keys = ("frechet_distance", "kid", "precision", "recall", "broken_rate", "noisy_rate",
            "confidence")

    def summary(images):
        score = judge.score(images, bootstrap=bootstrap)
        return {k: v for k, v in score.items() if k.split("_ci")[0] in keys}

    base_score = summary(base)
    mixes = []
    for kind in digit_judge.UNSEEN_KINDS:
        broken = digit_judge.unseen_broken(kind, len(base))
        for fraction in fractions:
            images, actual = mix(base, broken, fraction)
            score = judge.score(images, bootstrap=0)
            expected_precision = (1 - actual) * judge.score(
                images[:len(base) - int(round(fraction * len(base)))], bootstrap=0)["precision"]
            mixes.append({"kind": kind, "fraction": actual,
                          "broken_rate": score["broken_rate"],
                          "noisy_rate": score["noisy_rate"],
                          "precision": score["precision"],
                          "expected_precision": expected_precision,
                          "precision_drop": base_score["precision"] - score["precision"],
                          "frechet_distance": score["frechet_distance"]})
    return {"deterministic": deterministic, "test_accuracy": judge.test_accuracy,
            "held_out_vs_train": summary(held_out), "base": base_score,
            "num_base": len(base), "mixes": mixes}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default=None,
                        help="base set .npz (key 'samples'); default: the held-out digits")
    parser.add_argument("--fractions", default="0.02,0.05,0.1")
    parser.add_argument("--bootstrap", type=int, default=digit_judge.BOOTSTRAP)
    parser.add_argument("--output", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    if args.samples:
        base = digit_judge.as_float(np.load(args.samples)["samples"])
    else:
        base, _ = digit_judge.digits_split("test")
    result = calibrate(base, [float(f) for f in args.fractions.split(",")], args.bootstrap)
    result["base_source"] = args.samples or "held-out digits"
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
