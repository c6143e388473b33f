"""Training throughput end to end: the training CLI as a user runs it, against the training
step alone and the official training loop, at the same settings (digits preset, batch 64).

    python bench/end_to_end.py --steps 300 [--official /path/to/ncsnv2] [--rounds 2]

One after another on the same machine, each round:
- `python -m ncsn_tf.train --dataset=digits --n_iters=STEPS --nosnapshot_sampling` in a fresh
  workdir: the whole process's wall time, the images/s its progress lines report inside the
  loop (median), and where the time outside training steps goes, from when each log line
  arrived: start-up (imports, data, model, restore) until its "Training" line, then the
  loop, then the end (last step to exit);
- `bench/train_step.py --preset digits --batch 64`: the step alone (median of timed steps);
- with `--official`, the official training loop on the same digits (torch;
  `bench/quality_vs_official.py`'s runner): the images/s of its loop and the whole process.

Prints one JSON line per side and round, with the load average before it ran.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BATCH = 64  # the digits preset's


def train_cli(steps: int, extra: list[str]) -> dict:
    """Runs the training CLI and times its phases from the arrival of its log lines."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "ncsn_tf.train", "--dataset=digits",
                   f"--workdir={workdir}", f"--n_iters={steps}", "--nosnapshot_sampling",
                   *extra]
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, PYTHONPATH=REPO))
        arrivals = [(time.perf_counter() - start, line.rstrip())
                    for line in process.stderr]
        wall = time.perf_counter() - start
        if process.wait():
            raise SystemExit("the training CLI failed:\n" + "\n".join(text for _, text in arrivals))

    def first(pattern: str) -> float:
        return next(t for t, line in arrivals if re.search(pattern, line))

    rates = [float(m.group(1).replace(",", "")) for _, line in arrivals
             if (m := re.search(r"([\d,]+) img/s", line))]
    training, last_step = first(r"\bTraining "), first(rf"step {steps}/{steps}\b")
    in_loop = statistics.median(rates)
    return {"side": "ncsn_tf.train (CLI)", "steps": steps, "batch": BATCH,
            "images_per_s_in_loop": round(in_loop, 1),
            "images_per_s_whole_process": round(steps * BATCH / wall, 1),
            "wall_s": round(wall, 1), "startup_s": round(training, 1),
            "loop_s": round(last_step - training, 1), "end_s": round(wall - last_step, 1),
            "outside_steps_s": round(wall - steps * BATCH / in_loop, 1),
            "console_lines": len(arrivals)}


def train_step(steps: int) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, "train_step.py"), "--preset",
                          "digits", "--batch", str(BATCH), "--repeats", str(min(steps, 100))],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=REPO))
    record = json.loads(out.stdout.strip().splitlines()[-1])
    return {"side": "train_step (bench/train_step.py)", "batch": BATCH,
            "images_per_s": record["images_per_s"]}


def official(steps: int, checkout: str) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        weights = os.path.join(scratch, "ema_weights.npz")
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(HERE, "quality_vs_official.py"),
                        "--worker", "official_train", "--official", checkout,
                        "--n_iters", str(steps), "--seed", "0", "--weights", weights],
                       cwd=REPO, capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=REPO))
        wall = time.perf_counter() - start
        import numpy as np
        loop = float(np.load(weights)["train_seconds"])
    return {"side": "official training loop (torch)", "steps": steps, "batch": BATCH,
            "images_per_s_in_loop": round(steps * BATCH / loop, 1),
            "images_per_s_whole_process": round(steps * BATCH / wall, 1),
            "wall_s": round(wall, 1), "loop_s": round(loop, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions of all sides")
    parser.add_argument("--official", help="a checkout of ermongroup/ncsnv2 (needs torch)")
    parser.add_argument("--train_flags", default="",
                        help="extra flags of the training CLI, e.g. '--test_freq=0'")
    args = parser.parse_args(argv)
    sides = [lambda: train_cli(args.steps, args.train_flags.split()),
             lambda: train_step(args.steps)]
    if args.official:
        sides.append(lambda: official(args.steps, args.official))
    for round_ in range(args.rounds):
        for side in sides:
            load = os.getloadavg()[0]
            print(json.dumps({"bench": "end_to_end", "round": round_, **side(),
                              "load_before": round(load, 2)}), flush=True)


if __name__ == "__main__":
    main()
