"""Why the fast samplers returned broken images: the evidence behind each fix.

    python bench/sampler_failures.py --workdir=runs/q/ncsn_tf_seed0/workdir \
        --out=bench/results/failures

On one trained digits model and `--num_samples` seeds, with the digit judge of
`digit_judge.py` telling broken images from digits:

1. The probability-flow ODE (heun without churn) at N = 12 … 100 steps: if the broken rate
   does not fall with N, the failures are the ODE's own (the network's errors followed without
   correction), not the solver's discretisation.
2. Per step of the N = 12 ODE, broken seeds beside good ones: the noise the denoiser sees
   ‖x − D(x, σ)‖/(σ·√D) (1 when x carries noise σ) and the largest |D(x, σ)| (the data lie in
   [0, 1]), plus a PNG of D(x, σ) per step for 8 broken and 8 good seeds.
3. pc's predictor in closed form, for data at a point and the exact score: the noise x carries
   after one reverse-diffusion (old) or ancestral (new) step between levels a ratio γ apart.
4. The largest σ at which heun's churn evaluated the network, old rule against new.

Writes OUT/failures.md and OUT/ode_denoised.png.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def ode_run(net, shape: tuple, sigmas: np.ndarray, seeds: np.ndarray, record: bool = False):
    """Heun's method on the probability-flow ODE from u + σ_0·z (HeunODE's rule, written out
    to record every step): (final x, per-step noise ratio, per-step max |D|, D frames)."""
    import tensorflow as tf
    from ncsn_tf.sampling import philox
    from ncsn_tf.sampling.driver import INIT, per_seed
    seeds_t = tf.constant(seeds, tf.int64)
    x = (per_seed(philox.uniform, seeds_t, INIT, shape)
         + float(sigmas[0]) * per_seed(philox.normal, seeds_t, INIT, shape, step=1))
    dim = float(np.prod(shape))

    @tf.function
    def traced(x, sigma):
        return x + sigma ** 2 * net.score(x, tf.fill([tf.shape(x)[0]], sigma))

    def denoise(x, sigma: float):
        return traced(x, tf.constant(sigma, tf.float32))

    ratios, highest, frames = [], [], []
    levels = list(sigmas) + [0.0]
    for i in range(len(sigmas)):
        sigma, following = float(levels[i]), float(levels[i + 1])
        d = denoise(x, sigma)
        flat = tf.reshape(x - d, [len(seeds), -1])
        ratios.append((tf.norm(flat, axis=1) / (sigma * np.sqrt(dim))).numpy())
        highest.append(tf.reduce_max(tf.abs(tf.reshape(d, [len(seeds), -1])), axis=1).numpy())
        if record:
            frames.append(d.numpy())
        slope = (x - d) / sigma
        euler = x + (following - sigma) * slope
        if following > 0:
            slope_next = (euler - denoise(euler, following)) / following
            x = x + (following - sigma) * 0.5 * (slope + slope_next)
        else:
            x = euler
    return x.numpy(), np.array(ratios), np.array(highest), frames


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--out", default="bench/results/failures")
    args = parser.parse_args(argv)
    import digit_judge
    from ncsn_tf import images, noise, sampling
    from ncsn_tf.training import checkpoints

    judge = digit_judge.train_judge()
    net, config, _ = checkpoints.load(args.workdir)
    sigma_max, sigma_min = config.model.sigma_begin, config.model.sigma_end
    seeds = np.arange(args.num_samples)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    os.makedirs(args.out, exist_ok=True)

    def broken(x):
        _, probs = judge(images.to_uint8(np.clip(x, 0, 1)).numpy())
        return probs.argmax(axis=1) == digit_judge.NOT_A_DIGIT

    lines = ["# Why the fast samplers returned broken images", "",
             f"Model: `{args.workdir}`; {args.num_samples} seeds; broken = the digit judge's "
             "\"not a digit\".", "", "## 1. The probability-flow ODE at more and more steps", "",
             "| heun steps N | NFE | broken |", "|---|---|---|"]
    results = {}
    for n in (12, 25, 50, 100):
        x, ratios, highest, frames = ode_run(
            net, shape, sampling.karras_sigmas(sigma_max, sigma_min, n), seeds, record=n == 12)
        results[n] = (x, ratios, highest, frames)
        lines.append(f"| {n} | {2 * n - 1} | {broken(x).mean():.1%} |")
    x, ratios, highest, frames = results[12]
    bad = broken(x)
    agree = np.mean(broken(results[100][0]) == bad)
    lines += ["", f"The same seeds break at N = 12 and N = 100 ({agree:.1%} agree): the "
              "solver has converged, and the broken images are the ODE's own. Without noise "
              "after the first step nothing corrects the network's errors along the way.", "",
              "## 2. Per step of the N = 12 ODE: broken seeds beside good ones", "",
              "| σ | noise seen / σ (good) | (broken) | max abs D (good) | (broken) |",
              "|---|---|---|---|---|"]
    sigmas12 = sampling.karras_sigmas(sigma_max, sigma_min, 12)
    for i, sigma in enumerate(sigmas12):
        lines.append(f"| {sigma:.4f} | {np.median(ratios[i][~bad]):.3f} | "
                     f"{np.median(ratios[i][bad]):.3f} | {np.median(highest[i][~bad]):.2f} | "
                     f"{np.median(highest[i][bad]):.2f} |")
    lines += ["", "Medians over the seeds. The noise the denoiser sees stays at σ for both "
              "(the step sizes are right). But D(x, σ1) already carries the input's pixel "
              "noise (a 1,500-step model has not learned to denoise at σ1); for the broken "
              "seeds that texture is strong (max |D| well above 1), and the ODE, which never "
              "adds noise again, keeps it to the end: saturated texture instead of a digit. "
              "Samplers that re-noise at every step (ald, cas, pc, dpm with η > 0) wash it "
              "out. "
              "Rows of `ode_denoised.png`: D(x, σ) per step (left to right), 8 broken seeds "
              "then 8 good ones."]
    chosen = np.concatenate([np.flatnonzero(bad)[:8], np.flatnonzero(~bad)[:8]])
    grid = np.stack([np.clip(f[chosen], 0, 1) for f in frames], axis=1)  # [16, steps, ...]
    images.save_image_grid(grid.reshape(-1, *grid.shape[2:]),
                           os.path.join(args.out, "ode_denoised.png"), ncol=len(frames))

    lines += ["", "## 3. pc's predictor, in closed form", "",
              "Data at a point, exact score s = −(x − μ)/σ², x = μ + σ_i·z. Reverse diffusion "
              "x + (σ_i² − σ_(i+1)²)·s + √(σ_i² − σ_(i+1)²)·z leaves noise "
              "√(σ_(i+1)⁴/σ_i² + σ_i² − σ_(i+1)²); the ancestral step (σ_(i+1)/σ_i)·√(σ_i² − "
              "σ_(i+1)²)·z leaves exactly σ_(i+1).", "",
              "| levels between σ1 and σL | ratio γ | noise left / σ_(i+1), reverse diffusion "
              "| ancestral |", "|---|---|---|---|"]
    for n in (6, 12, 25, 49):
        gamma = float(noise.geometric_ratio(sigma_max, sigma_min, n))
        old = np.sqrt(1 / gamma ** 2 + gamma ** 2 - 1)
        lines.append(f"| {n} | {gamma:.3f} | {old:.3f} | 1.000 |")

    gamma = np.sqrt(2) - 1
    lines += ["", "## 4. heun's churn", "",
              f"With churn, σ̂ = σ_i·(1 + γ), γ ≤ √2 − 1: the first step evaluated the network "
              f"at σ̂ = {sigma_max * (1 + gamma):.2f} > σ1 = {sigma_max}, outside the range "
              f"it was trained on. σ̂ is now capped at σ1 (`tests/test_samplers.py`).", ""]
    with open(os.path.join(args.out, "failures.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
