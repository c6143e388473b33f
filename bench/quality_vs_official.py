"""Sample quality of ncsn_tf against the official NCSNv2 code at equal settings, side by side.

    python bench/quality_vs_official.py --official=/tmp/ncsnv2 --seeds=0,1,2,3,4 --out=runs/q

Both sides train the `digits` preset (NCSNv2 ngf 16, L 49, σ1 8.6, σL 0.01, Adam lr 1e-3,
EMA 0.99, batch 64, 1,500 steps) on the same 1,600 training images at 16 px (built once by
`ncsn_tf.data`), then draw `--num_samples` images from their EMA weights with annealed Langevin
dynamics (T 5, ε 1.6e-5, final denoising step):

- official: a checkout of ermongroup/ncsnv2 (`--official`; fetched by you, never committed),
  run with torch: its `NCSNv2`, `anneal_dsm_score_estimation`, `get_optimizer`, `EMAHelper`
  and `anneal_Langevin_dynamics`, data from a shuffling `DataLoader` as its runner does;
- ncsn_tf: the public CLIs, `python -m ncsn_tf.train --dataset=digits --seed=S` and
  `python -m ncsn_tf.sample --npz=...`.

The official side can run on a GPU machine with torch alone (no TensorFlow there): write the
training digits once with `--worker digits_npz --images=digits.npz`, then run the workers
`official_train` (`--images=digits.npz --device=cuda`) and `official_sample` (`--device=cuda`)
there into `OUT/official_seed<S>/ema_weights.npz` and `samples_official.npz`; the
orchestration reuses whatever files it finds.

`--cross_seeds=K` adds, for the first K seeds (default 1), the other two pairings of trained
weights and sampler (weights exchanged in the official layout), which tells a training gap
from a sampling gap. Each set of weights also gets a held-out DSM loss: the exact mean over
the 197 test digits × 20 fixed noise draws, computed identically for every run.

Every run is scored by `digit_judge` (a convolutional classifier trained here, with an
eleventh class for broken images): Fréchet distance, KID, precision, recall and the
broken-sample rate in its features, each with a bootstrap 95% interval, and a grid of the 32
least realistic samples beside each samples file. Output in `--out`: `results.jsonl` (one JSON
line per run), a grid per pairing (`<train>_trained__<sampler>_sampler.png`, seed of the
first run) and a Markdown table (`summary.md`, also printed: mean ± sd over training seeds,
and each metric's gap between the sides with its standard error). Finished runs are reused:
rerun to add seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

SIDES = ("official", "ncsn_tf")
HELD_OUT_DRAWS = 20  # noise draws per test image for the held-out DSM loss


def _digits_config():
    from ncsn_tf.config import presets
    return presets.get("digits")


# ---------------------------------------------------------------- the official side (torch)

def _official_namespace(config, device: str = "cpu") -> types.SimpleNamespace:
    """The official code's config object for an ncsn_tf config (same settings)."""
    ns = types.SimpleNamespace
    d, m, o, t = config.data, config.model, config.optim, config.training
    return ns(
        device=device,
        data=ns(dataset="DIGITS", image_size=d.image_size, channels=d.channels,
                logit_transform=False, uniform_dequantization=False,
                gaussian_dequantization=False, random_flip=False, rescaled=False),
        model=ns(sigma_begin=m.sigma_begin, sigma_end=m.sigma_end, num_classes=m.num_scales,
                 sigma_dist=m.sigma_dist, ema=True, ema_rate=m.ema_rate, spec_norm=False,
                 normalization="InstanceNorm++", nonlinearity="elu", ngf=m.ngf),
        optim=ns(optimizer="Adam", lr=o.lr, beta1=o.beta1, weight_decay=o.weight_decay,
                 amsgrad=False, eps=o.adam_eps),
        training=ns(batch_size=t.batch_size, n_iters=t.n_iters, anneal_power=t.anneal_power))


def _import_official(path: str):
    """The official modules, imported from the checkout at `path`."""
    if not os.path.isfile(os.path.join(path, "models", "ncsnv2.py")):
        raise SystemExit(f"--official={path} is not a checkout of ermongroup/ncsnv2 "
                         "(models/ncsnv2.py is missing)")
    sys.path.insert(0, path)
    import losses
    import models
    from losses.dsm import anneal_dsm_score_estimation
    from models.ema import EMAHelper
    from models.ncsnv2 import NCSNv2
    return types.SimpleNamespace(NCSNv2=NCSNv2, dsm=anneal_dsm_score_estimation,
                                 get_optimizer=losses.get_optimizer, EMAHelper=EMAHelper,
                                 get_sigmas=models.get_sigmas,
                                 langevin=models.anneal_Langevin_dynamics)


def official_train(args) -> None:
    """Trains with the official code as its runner does; saves the EMA weights. The training
    digits come from `--images` (an .npz written by `--worker digits_npz`) when given, so this
    runs where TensorFlow is not installed (e.g. a GPU machine with torch alone)."""
    import torch
    official = _import_official(args.official)
    config = _digits_config()
    config.training.n_iters = args.n_iters
    ns = _official_namespace(config, args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.images:
        images = np.load(args.images)["train"]
    else:
        from digit_judge import digits_split
        images, _ = digits_split("train")
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=ns.training.batch_size,
                                         shuffle=True)
    score = official.NCSNv2(ns).to(args.device)
    optimizer = official.get_optimizer(ns, score.parameters())
    ema = official.EMAHelper(mu=ns.model.ema_rate)
    ema.register(score)
    sigmas = official.get_sigmas(ns)
    step, losses, start = 0, [], time.time()
    while step < ns.training.n_iters:
        for (x,) in loader:
            x = x.to(args.device)
            score.train()
            loss = official.dsm(score, x, sigmas, None, ns.training.anneal_power)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(score)
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                print(f"official seed {args.seed} step {step} loss "
                      f"{np.mean(losses[-100:]):.3f}", flush=True)
            if step >= ns.training.n_iters:
                break
    weights = {k: v.detach().cpu().numpy() for k, v in ema.state_dict().items()}
    np.savez(args.weights, sigmas=sigmas.cpu().numpy(), train_seconds=time.time() - start,
             last_losses=np.array(losses[-100:]), **weights)


def official_sample(args) -> None:
    """The official sampler on weights in the official layout."""
    import torch
    official = _import_official(args.official)
    ns = _official_namespace(_digits_config(), args.device)
    s = _digits_config().sampling
    weights = np.load(args.weights)
    score = official.NCSNv2(ns).to(args.device)
    state = {k: torch.from_numpy(weights[k]) for k in score.state_dict()}
    score.load_state_dict(state)
    score.eval()
    torch.manual_seed(args.seed)
    out = []
    batch = args.sampling_batch_size or s.sampling_batch_size
    for start in range(0, args.num_samples, batch):
        n = min(batch, args.num_samples - start)
        init = torch.rand(n, ns.data.channels, ns.data.image_size, ns.data.image_size,
                          device=args.device)
        x = official.langevin(init, score, score.sigmas.cpu().numpy(), s.n_steps_each,
                              s.step_lr, final_only=True, verbose=False,
                              denoise=s.denoise)[-1]
        out.append(x.clamp(0, 1).cpu().numpy().transpose(0, 2, 3, 1))
    np.savez(args.samples, samples=_to_uint8(np.concatenate(out)))


def digits_npz(args) -> None:
    """The training digits as the official side trains on them, for `--images`."""
    from digit_judge import digits_split
    np.savez(args.images, train=digits_split("train")[0])


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- the ncsn_tf side

def ours_export(args) -> None:
    """The EMA weights of an ncsn_tf workdir in the official layout (for the official sampler)."""
    from ncsn_tf import convert
    from ncsn_tf.training import checkpoints
    net, _, _ = checkpoints.load(args.workdir, ema=True)
    weights = {name: (v.numpy().transpose(3, 2, 0, 1) if len(v.shape) == 4 else v.numpy())
               for name, v in convert.official_weight_map(net).items()}
    np.savez(args.weights, sigmas=net.sigmas.numpy(), train_seconds=args.train_seconds,
             **weights)


def _our_net(weights_path: str):
    from ncsn_tf import convert, models
    weights = np.load(weights_path)
    config = _digits_config()
    net = models.build(config)
    convert.assign_official_weights(net, {k: weights[k] for k in
                                          (*convert.official_weight_map(net), "sigmas")})
    return net, config


def ours_sample(args) -> None:
    """The ncsn_tf sampler on weights in the official layout."""
    from ncsn_tf import sampling
    net, config = _our_net(args.weights)
    sampler = sampling.AnnealedLangevin.from_config(
        lambda x, labels: net(x, labels, training=False), net.sigmas, config)
    seeds = args.seed * args.num_samples + np.arange(args.num_samples)
    batch = config.sampling.sampling_batch_size
    out = [sampler.sample(seeds[i:i + batch])["samples"].numpy()
           for i in range(0, len(seeds), batch)]
    np.savez(args.samples, samples=_to_uint8(np.concatenate(out)))


def held_out_loss(args) -> None:
    """Exact mean DSM loss over test digits × HELD_OUT_DRAWS fixed draws (same for every run)."""
    import tensorflow as tf
    from digit_judge import digits_split
    from ncsn_tf.training.losses import dsm_loss
    from ncsn_tf.training.score_model import draw_perturbation
    net, config = _our_net(args.weights)
    images, _ = digits_split("test")
    total = 0.0
    for draw in range(HELD_OUT_DRAWS):
        labels, noise = draw_perturbation(tf.constant([1234, draw], tf.int64), images.shape,
                                          config.model.num_scales)
        total += float(tf.reduce_sum(dsm_loss(lambda y, i: net(y, i, training=False), images,
                                              net.sigmas, labels, noise)))
    print(json.dumps({"held_out_loss": total / (HELD_OUT_DRAWS * len(images))}))


# ---------------------------------------------------------------- orchestration

def _run(cmd: list[str], log: str) -> str:
    """Runs a command, its output appended to `log`; returns its stdout's last line."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _worker(name: str, args, **extra) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
           "--official", args.official, "--n_iters", str(args.n_iters),
           "--num_samples", str(args.num_samples)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def _train(side: str, seed: int, args, log: str) -> tuple[str, dict]:
    """Trains one side for one seed (reused if done); its weights file and training facts."""
    run_dir = os.path.join(args.out, f"{side}_seed{seed}")
    weights = os.path.join(run_dir, "ema_weights.npz")
    facts_path = os.path.join(run_dir, "facts.json")
    if not os.path.exists(weights):
        os.makedirs(run_dir, exist_ok=True)
        if side == "official":  # it times itself (train_seconds in the weights file)
            _run(_worker("official_train", args, seed=seed, weights=weights), log)
        else:
            workdir = os.path.join(run_dir, "workdir")
            start = time.time()
            _run([sys.executable, "-m", "ncsn_tf.train", "--dataset=digits", f"--seed={seed}",
                  f"--n_iters={args.n_iters}", f"--workdir={workdir}"], log)
            seconds = time.time() - start
            _run(_worker("ours_export", args, workdir=workdir, weights=weights,
                         train_seconds=seconds), log)
    if not os.path.exists(facts_path):
        facts = {"train_seconds": round(float(np.load(weights)["train_seconds"]), 1),
                 **json.loads(_run(_worker("held_out_loss", args, weights=weights), log))}
        with open(facts_path, "w") as f:
            json.dump(facts, f)
    with open(facts_path) as f:
        return weights, json.load(f)


def _samples(train_side: str, sampler: str, seed: int, weights: str, args, log: str) -> str:
    path = os.path.join(args.out, f"{train_side}_seed{seed}", f"samples_{sampler}.npz")
    if os.path.exists(path):
        return path
    if train_side == "ncsn_tf" and sampler == "ncsn_tf":  # the public CLI, end to end
        _run([sys.executable, "-m", "ncsn_tf.sample",
              f"--workdir={os.path.join(args.out, f'ncsn_tf_seed{seed}', 'workdir')}",
              f"--num_samples={args.num_samples}", f"--seed={seed * args.num_samples}",
              f"--npz={path}", f"--out={path[:-4]}.png"], log)
    else:
        worker = "official_sample" if sampler == "official" else "ours_sample"
        _run(_worker(worker, args, seed=seed, weights=weights, samples=path), log)
    return path


METRICS = ("frechet_distance", "kid", "precision", "recall", "broken_rate", "held_out_loss")


def _summary(rows: list[dict]) -> str:
    """Markdown: mean ± sd over training seeds per pairing; then each metric's gap between the
    two sides (own samplers) with its standard error over seeds (Welch)."""
    lines = ["| trained by | sampled by | seeds | Fréchet distance | KID | precision | recall | "
             "broken | held-out DSM loss | per-seed distance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for train_side in SIDES:
        for sampler in SIDES:
            group = [r for r in rows if r["trained_by"] == train_side
                     and r["sampled_by"] == sampler]
            if not group:
                continue

            def stat(key, digits=2):
                v = np.array([r[key] for r in group])
                return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0:.{digits}f}"

            broken = sum(round(r["broken_rate"] * r["num_samples"]) for r in group)
            per_seed = ", ".join(f"{r['frechet_distance']:.2f}" for r in group)
            lines.append(
                f"| {train_side} | {sampler} | {len(group)} | {stat('frechet_distance')} | "
                f"{stat('kid')} | {stat('precision', 3)} | {stat('recall', 3)} | "
                f"{broken}/{sum(r['num_samples'] for r in group)} | "
                f"{stat('held_out_loss', 3)} | "
                f"{per_seed} |")
    lines.append("")
    for metric in METRICS:
        own = {side: np.array([r[metric] for r in rows
                               if r["trained_by"] == r["sampled_by"] == side]) for side in SIDES}
        if all(len(v) > 1 for v in own.values()):
            # Standard error of the difference of the two means (Welch): the gap's noise.
            se = np.sqrt(sum(v.var(ddof=1) / len(v) for v in own.values()))
            gap = own["ncsn_tf"].mean() - own["official"].mean()
            lines.append(f"ncsn_tf − official (own samplers), {metric}: {gap:+.3f} ± {se:.3f} "
                         "(difference of means ± its standard error"
                         + (f", {gap / se:+.1f} se)" if se > 0 else ")"))
    return "\n".join(lines)


def orchestrate(args) -> None:
    import digit_judge
    from ncsn_tf.images import save_image_grid
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "log.txt")
    judge = digit_judge.train_judge()
    print(f"digit judge: test accuracy {judge.test_accuracy:.3f}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    # Each side with its own sampler for every seed first, then the cross pairings.
    runs = [(side, side, seed) for side in SIDES for seed in seeds]
    runs += [(a, b, seed) for a in SIDES for b in SIDES if a != b
             for seed in seeds[:args.cross_seeds]]
    rows = []
    for train_side, sampler, seed in runs:
        weights, facts = _train(train_side, seed, args, log)
        path = _samples(train_side, sampler, seed, weights, args, log)
        images = np.load(path)["samples"]
        row = {"trained_by": train_side, "sampled_by": sampler, "seed": seed,
               "n_iters": args.n_iters, **facts, **judge.score(images),
               "judge_test_accuracy": judge.test_accuracy}
        rows.append(row)
        print(json.dumps(row), flush=True)
        digit_judge.save_worst_grid(judge, images, path[:-4] + "_worst.png")
        grid = os.path.join(args.out, f"{train_side}_trained__{sampler}_sampler.png")
        if seed == seeds[0]:
            save_image_grid(images[:100] / 255.0, grid, ncol=10)
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table = _summary(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)


WORKERS = {"official_train": official_train, "official_sample": official_sample,
           "ours_export": ours_export, "ours_sample": ours_sample,
           "held_out_loss": held_out_loss, "digits_npz": digits_npz}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True,
                        help="path of a checkout of ermongroup/ncsnv2 (needs torch)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    parser.add_argument("--out", default="runs/quality_vs_official", help="output folder")
    parser.add_argument("--n_iters", type=int, default=1500, help="training steps per run")
    parser.add_argument("--num_samples", type=int, default=2000, help="samples per run")
    parser.add_argument("--cross_seeds", type=int, default=1,
                        help="for this many seeds (the first ones) also sample each side's "
                             "weights with the other side's sampler (0: none)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--sampling_batch_size", type=int, default=0,
                        help="images per official sampler call (0: the preset's)")
    parser.add_argument("--device", default="cpu",
                        help="torch device of the official side (cpu, cuda)")
    for name, kind in (("seed", int), ("weights", str), ("samples", str), ("workdir", str),
                       ("train_seconds", float), ("images", str)):
        parser.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
