"""Figures of annealed Langevin dynamics on problems with a closed-form score.

    python bench/closed_form_figures.py --out_dir=figures

writes two PNGs (and prints their numbers as JSON lines):
- mixture.png: a 2-D mixture of two Gaussians (weights 0.2/0.8) sampled with its exact score by
  annealed Langevin and by plain Langevin at the smallest σ with the same number of steps,
  from the same uniform starts, over the density. Annealing recovers the weights; plain
  Langevin keeps the split of its starting points.
- variance_ratio.png: Technique 4. For a single data point the perturbed density at level i is
  N(0, σi²I); Langevin at σi started from N(0, σ(i−1)²I) ends after T steps with the variance
  ratio of the paper's Eq. 6. Measured ratios (dots) against Eq. 6 (lines) over ε.
The same checks, with tolerances, are tests/test_closed_form.py. Needs matplotlib
(`pip install matplotlib`), which ncsn_tf itself does not.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

flags.DEFINE_string("out_dir", "closed_form_figures", "Folder for the PNG files.")
flags.DEFINE_integer("points", 4000, "Samples per mixture panel.")
FLAGS = flags.FLAGS

MEANS = ((-5.0, -5.0), (5.0, 5.0))
WEIGHTS = (0.2, 0.8)


def mixture_score(sigmas):
    """Exact score of the mixture (unit-variance components) perturbed by N(0, σ²I)."""
    import tensorflow as tf

    sigmas = tf.constant(sigmas, tf.float32)
    means, log_w = tf.constant(MEANS), tf.math.log(tf.constant(WEIGHTS))

    def score(x, labels):  # x: [N, points, 2]
        var = 1.0 + tf.square(tf.gather(sigmas, labels))[:, None, None]
        diff = x[:, :, None, :] - means
        resp = tf.nn.softmax(log_w - tf.reduce_sum(tf.square(diff), -1) / (2.0 * var), -1)
        return -tf.reduce_sum(resp[..., None] * diff, axis=2) / var
    return score


def mixture_figure(path: str, points: int) -> dict:
    import matplotlib.pyplot as plt
    import numpy as np

    from ncsn_tf.sampling import AnnealedLangevin

    seeds = np.arange(4)
    x0 = np.random.default_rng(0).uniform(-8, 8, (4, points // 4, 2)).astype(np.float32)
    sigmas = np.geomspace(20.0, 0.1, 10).astype(np.float32)
    annealed = AnnealedLangevin(mixture_score(sigmas), sigmas, x0.shape[1:], n_steps_each=300,
                                step_lr=0.002, clip=False)
    x_annealed = annealed.finish(annealed.run_levels(x0, seeds, 0, 10)["samples"]).numpy()
    plain = AnnealedLangevin(mixture_score(sigmas[-1:]), sigmas[-1:], x0.shape[1:],
                             n_steps_each=3000, step_lr=0.05 * (1 + sigmas[-1] ** 2), clip=False,
                             denoise=False)
    x_plain = plain.run_levels(x0, seeds, 0, 1)["samples"].numpy()

    grid = np.linspace(-9, 9, 200)
    gx, gy = np.meshgrid(grid, grid)
    density = sum(w * np.exp(-((gx - m[0]) ** 2 + (gy - m[1]) ** 2) / 2) / (2 * np.pi)
                  for w, m in zip(WEIGHTS, MEANS))
    fractions = {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), sharex=True, sharey=True)
    for ax, (name, x) in zip(axes, [("start: uniform", x0), ("annealed Langevin", x_annealed),
                                    ("plain Langevin at σ_L", x_plain)]):
        x = x.reshape(-1, 2)
        fractions[name] = float(np.mean(x.sum(-1) < 0))
        ax.contour(gx, gy, density, levels=np.geomspace(1e-4, density.max(), 6), colors="k",
                   linewidths=0.6)
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4)
        ax.set_title(f"{name}\nfraction in the 0.2 mode: {fractions[name]:.3f}")
        ax.set_xlim(-9, 9)
        ax.set_ylim(-9, 9)
        ax.set_aspect("equal")
    fig.suptitle("Mixture 0.2·N((−5,−5), I) + 0.8·N((5,5), I), exact scores, 3,000 steps each")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"figure": path, "fraction_in_0.2_mode": fractions}


def variance_ratio_figure(path: str) -> dict:
    import matplotlib.pyplot as plt
    import numpy as np
    import tensorflow as tf

    from ncsn_tf import noise
    from ncsn_tf.sampling import AnnealedLangevin

    table = (1.0, 0.01, 10)  # σ1, σL, L: γ ≈ 1.67
    sigmas, gamma = noise.get_sigmas(*table), noise.geometric_ratio(*table)
    sigma_end, level, dim = float(sigmas[-1]), 5, 20_000
    sigmas_t = tf.constant(sigmas)
    point_score = lambda x, labels: -x / tf.square(tf.gather(sigmas_t, labels))[:, None]  # noqa
    fractions = np.geomspace(1e-3, 1.0, 13)  # ε / σL²
    x0 = (sigmas[level - 1] * np.random.default_rng(0).standard_normal((2, dim))).astype(
        np.float32)
    sampler = AnnealedLangevin(point_score, sigmas, (dim,), clip=False, denoise=False)
    rows = []
    fig, ax = plt.subplots(figsize=(7, 5))
    for n_steps_each, color in [(1, "C0"), (5, "C1"), (20, "C2")]:
        curve = np.geomspace(1e-3, 1.0, 200)
        ax.plot(curve, [noise.variance_ratio(f * sigma_end**2, n_steps_each, gamma, sigma_end)
                        for f in curve], color=color, label=f"Eq. 6, T = {n_steps_each}")
        measured = []
        for f in fractions:
            x = sampler.run_levels(x0, [0, 1], level, level + 1, n_steps_each=n_steps_each,
                                   step_lr=f * sigma_end**2)["samples"].numpy()
            measured.append(float(np.mean(x.astype(np.float64) ** 2) / sigmas[level] ** 2))
            rows.append({"T": n_steps_each, "step_lr": float(f * sigma_end**2),
                         "measured": measured[-1],
                         "eq6": noise.variance_ratio(f * sigma_end**2, n_steps_each, gamma,
                                                     sigma_end)})
        ax.scatter(fractions, measured, color=color, marker="o", s=18)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("ε / σ_L²")
    ax.set_ylabel("Var(x_T) / σ_i²")
    ax.set_title(f"Technique 4: measured (dots, {2 * dim:,} values) vs Eq. 6, γ = {gamma:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"figure": path, "gamma": gamma, "ratios": rows}


def main(argv):
    del argv
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (it is not an ncsn_tf dependency): "
              "pip install matplotlib", file=sys.stderr)
        return 1
    matplotlib.use("Agg")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    print(json.dumps(mixture_figure(os.path.join(FLAGS.out_dir, "mixture.png"), FLAGS.points)))
    print(json.dumps(variance_ratio_figure(os.path.join(FLAGS.out_dir, "variance_ratio.png"))))
    return 0


if __name__ == "__main__":
    app.run(main)
