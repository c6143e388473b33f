"""Quality against cost of the samplers, on several independently trained digits models.

    for s in 0 1 2; do
        python -m ncsn_tf.train --dataset=digits --seed=$s --workdir=runs/q/ncsn_tf_seed$s/workdir
    done
    python bench/sampler_quality.py --workdirs=runs/q/ncsn_tf_seed0/workdir,\
runs/q/ncsn_tf_seed1/workdir,runs/q/ncsn_tf_seed2/workdir \
        --num_samples=2000 --out=runs/samplers --output=bench/results/samplers_digits.jsonl

For each model (workdir i) and each sampler setting below (or `--settings`), `--num_samples`
images from the EMA weights, seeds i·N … i·N + N − 1, saved as `OUT/model<i>/<setting>.npz`
(reused when present, so a rerun only scores) and scored by `digit_judge` with bootstrap 95%
intervals: Fréchet distance, KID, precision, recall, broken-sample rate (the judge's "not a
digit"), pixel-noise rate and confidence; beside each file a grid of the 32 least realistic
samples and one of the (first 32) samples the judge calls broken. One JSON line per model
and setting; then a Markdown table over the models (mean ± standard deviation across models;
broken samples counted over all of them, and whether more often than ALD's on the same
models, one-sided p < 0.05; on how many models Fréchet distance, precision and recall are
all inside ALD's bootstrap 95% intervals or better) and, with `--plot` (needs matplotlib),
quality against NFE as a PNG. `--summarize=JSONL` redoes the table and plot from earlier lines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digit_judge  # noqa: E402

# name: config fields of the sampler (ncsn_tf.config.presets.SamplingConfig).
SETTINGS = {
    "ald": dict(sampler="ald"),  # the paper's: T = 5 on all 49 levels
    "dpm_N12": dict(sampler="dpm", num_steps=12),  # dpm's default (η 1.5, s_noise 0.8)
    "pc_N49": dict(sampler="pc", num_steps=49),  # pc's default on the digits preset
    "heun_N18": dict(sampler="heun", num_steps=18, churn=10.0, s_noise=0.8),
    "heun_N25": dict(sampler="heun", num_steps=25, churn=10.0, s_noise=0.8),
    "heun_N12": dict(sampler="heun", num_steps=12, churn=10.0, s_noise=0.8),
    "heun_N6": dict(sampler="heun", num_steps=6, churn=10.0, s_noise=0.8),
    "heun_N18_s1": dict(sampler="heun", num_steps=18, churn=10.0, s_noise=1.0),
    "heun_N18_ode": dict(sampler="heun", num_steps=18, churn=0.0),  # the probability-flow ODE
    "dpm_N6": dict(sampler="dpm", num_steps=6),
    "dpm_N8": dict(sampler="dpm", num_steps=8),
    "dpm_N25": dict(sampler="dpm", num_steps=25),
    "dpm_N12_ode": dict(sampler="dpm", num_steps=12, eta=0.0),  # DPM-Solver++(2M) itself
    "dpm_N12_eta1_s1": dict(sampler="dpm", num_steps=12, eta=1.0, s_noise=1.0),
    "pc_N6": dict(sampler="pc", num_steps=6),
    "pc_N12": dict(sampler="pc", num_steps=12),
    "pc_N25": dict(sampler="pc", num_steps=25),
    "cas_N49": dict(sampler="cas", num_steps=49, step_lr=5e-5),  # η = 0.5
    "ald_T1": dict(sampler="ald", n_steps_each=1, step_lr=2.45e-5),  # ε of Technique 4, T = 1
}
METRICS = ("frechet_distance", "kid", "precision", "recall", "broken_rate", "noisy_rate",
           "confidence")


def samples(workdir: str, fields: dict, first_seed: int, num_samples: int, path: str
            ) -> tuple[np.ndarray, int, float | None]:
    """(uint8 images, NFE, images/s or None when reused) of one setting on one model."""
    from ncsn_tf import images, sampling
    from ncsn_tf.training import checkpoints
    from ncsn_tf.config import presets
    net, config, _ = checkpoints.load(workdir)
    config = presets.override(config, **fields)
    sampler = sampling.for_network(net, config)
    if os.path.exists(path):
        return np.load(path)["samples"], sampler.nfe(), None
    batch = config.sampling.sampling_batch_size
    seeds = first_seed + np.arange(num_samples, dtype=np.int64)
    sampler.sample(seeds[:2])  # trace outside the timing
    start = time.perf_counter()
    out = np.concatenate([images.to_uint8(sampler.sample(seeds[i:i + batch])["samples"]).numpy()
                          for i in range(0, num_samples, batch)])
    rate = num_samples / (time.perf_counter() - start)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, samples=out, seeds=seeds)
    return out, sampler.nfe(), rate


def save_broken_grid(judge, images: np.ndarray, path: str, n: int = 32) -> int:
    """A grid of the images the judge calls "not a digit" (the first `n`), to see what the
    broken count counts; returns how many there are (no file when none)."""
    from ncsn_tf.images import save_image_grid
    broken = np.flatnonzero(judge(images)[1].argmax(axis=1) == digit_judge.NOT_A_DIGIT)
    if len(broken):
        save_image_grid(digit_judge.as_float(images)[broken[:n]], path, ncol=8)
    return len(broken)


def within_reference(row: dict, reference: dict) -> bool:
    """Whether a setting is nowhere worse than the reference sampler beyond the reference's
    bootstrap 95% interval on the same model: Fréchet distance at most its upper end,
    precision and recall at least their lower ends (inside the interval or better)."""
    return (row["frechet_distance"] <= reference["frechet_distance_ci"][1]
            and row["precision"] >= reference["precision_ci"][0]
            and row["recall"] >= reference["recall_ci"][0])


def more_broken_p(broken: int, total: int, ref_broken: int, ref_total: int) -> float:
    """One-sided p-value that a setting breaks images more often than the reference: given
    the k + k_ref broken images of both, the chance that at least k of them fall on the
    setting if both had the same rate (the conditional binomial test of two Poisson counts)."""
    n, share = broken + ref_broken, total / (total + ref_total)
    return float(sum(math.comb(n, j) * share ** j * (1 - share) ** (n - j)
                     for j in range(broken, n + 1)))


def table(rows: list[dict], reference: str = "ald") -> str:
    """Markdown: one row per setting, mean ± sd over the models; broken samples counted over
    all of them, and whether more often than the reference's on the same models (one-sided
    p < 0.05); on how many models the setting is within the reference's intervals."""
    refs = {r["model"]: r for r in rows if r["setting"] == reference}
    lines = ["| sampler | NFE | models | Fréchet distance | KID | precision | recall | "
             f"broken (of all samples) | more broken than {reference} (p) | "
             f"within {reference}'s 95% interval or better |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == name]

        def stat(key, digits=2):
            v = np.array([r[key] for r in group])
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            return f"{v.mean():.{digits}f} ± {sd:.{digits}f}"

        def broken(group):
            return (sum(round(r["broken_rate"] * r["num_samples"]) for r in group),
                    sum(r["num_samples"] for r in group))

        k, total = broken(group)
        ref_k, ref_total = broken([refs[r["model"]] for r in group if r["model"] in refs])
        p = more_broken_p(k, total, ref_k, ref_total) if ref_total else float("nan")
        inside = sum(within_reference(r, refs[r["model"]]) for r in group if r["model"] in refs)
        lines.append(f"| {name} | {group[0]['nfe']} | {len(group)} | {stat('frechet_distance')}"
                     f" | {stat('kid')} | {stat('precision', 3)} | {stat('recall', 3)} | "
                     f"{k}/{total} ({100 * k / total:.2f}%) | "
                     f"{'yes' if p < 0.05 else 'no'} ({p:.2g}) | {inside} of "
                     f"{len(group)} models |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, reference: str = "ald") -> None:
    """Quality against NFE (log scale): Fréchet distance, precision, recall and the broken
    rate, one line per sampler (mean over the models, bars: their range), the reference's
    mean ± sd as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = (("frechet_distance", "Fréchet distance (judge features)"),
               ("precision", "precision"), ("recall", "recall"),
               ("broken_rate", "broken images (%)"))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    by_sampler: dict[str, list[dict]] = {}  # one line per setting family: N varies along it
    for r in rows:
        by_sampler.setdefault(re.sub(r"_N\d+", "", r["setting"]), []).append(r)
    for ax, (key, label) in zip(axes, metrics):
        scale = 100.0 if key == "broken_rate" else 1.0
        ref = np.array([r[key] for r in rows if r["setting"] == reference]) * scale
        if len(ref):
            ax.axhspan(ref.mean() - ref.std(), ref.mean() + ref.std(), color="0.85",
                       label=f"{reference} (paper), mean ± sd")
        for sampler, group in by_sampler.items():
            points = {}
            for r in group:
                points.setdefault((r["nfe"], r["setting"]), []).append(r[key] * scale)
            ordered = sorted(points.items())
            nfe = [k[0] for k, _ in ordered]
            mean = [np.mean(v) for _, v in ordered]
            low = [max(np.mean(v) - np.min(v), 0.0) for _, v in ordered]
            high = [max(np.max(v) - np.mean(v), 0.0) for _, v in ordered]
            ax.errorbar(nfe, mean, yerr=[low, high], marker="o", capsize=3, label=sampler)
        ax.set_xscale("log")
        ax.set_xlabel("score evaluations per image (NFE)")
        ax.set_title(label)
        if key in ("frechet_distance", "broken_rate"):
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0.0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdirs",
                        help="comma-separated trained digits workdirs (≥ 3 training seeds)")
    parser.add_argument("--summarize", default=None, metavar="JSONL",
                        help="only print the table (and --plot) of earlier JSON lines")
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated names among: {', '.join(SETTINGS)}")
    parser.add_argument("--out", default="runs/samplers", help="samples and worst-sample grids")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--output", default=None, help="also append the JSON lines here")
    parser.add_argument("--plot", default=None, help="also write the quality-against-NFE PNG")
    args = parser.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print(table(rows))
        if args.plot:
            plot(rows, args.plot)
        return
    if not args.workdirs:
        parser.error("--workdirs is required (or --summarize)")
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; expected among {list(SETTINGS)}")
    judge = digit_judge.train_judge()
    rows = []
    for name in names:
        for i, workdir in enumerate(args.workdirs.split(",")):
            path = os.path.join(args.out, f"model{i}", f"{name}.npz")
            images, nfe, rate = samples(workdir, SETTINGS[name], i * args.num_samples,
                                        args.num_samples, path)
            score = judge.score(images, bootstrap=args.bootstrap)
            digit_judge.save_worst_grid(judge, images, path[:-4] + "_worst.png")
            save_broken_grid(judge, images, path[:-4] + "_broken.png")
            row = {"setting": name, **SETTINGS[name], "model": i, "workdir": workdir,
                   "nfe": nfe, "samples_per_s": rate, "samples": path, **score}
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.output:
                with open(args.output, "a") as f:
                    f.write(line + "\n")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
