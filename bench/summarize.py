"""Turns benchmark JSON lines into the Markdown tables of the README.

    python bench/summarize.py bench/results/cpu_2core.jsonl

Rows of the same configuration (bench, batch, precision, XLA, oneDNN setting) are merged by
their median, so several back-to-back rounds give one row each. Lines of `official_reference`
(the official PyTorch model, timed by development tooling outside this repository) set the
baseline that the `vs official` columns divide by: float32 training and score evaluation at
the same batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def read(paths: list[str]) -> list[dict]:
    """All JSON records of the given `.jsonl` files, in order."""
    records = []
    for path in paths:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def official_baseline(records: list[dict]) -> dict[int, dict[str, float]]:
    """Median images/s of the official model per batch size and the number of runs behind
    them: {"train": …, "score": …, "runs": …}."""
    by_batch = defaultdict(lambda: {"train": [], "score": []})
    for r in records:
        if r["bench"] == "official_reference":
            by_batch[r["batch"]]["train"].append(r["train_img_per_s"])
            by_batch[r["batch"]]["score"].append(r["score_img_per_s"])
    return {b: {"train": _median(d["train"]), "score": _median(d["score"]),
                "runs": len(d["train"])} for b, d in by_batch.items()}


def throughput_table(records: list[dict]) -> str:
    """One row per (what, batch, precision, XLA, oneDNN setting): images/s, GFLOP/s, share of
    the 3x3-conv ceiling, peak memory, and the ratio to the official float32 model at the same
    batch."""
    baseline = official_baseline(records)
    groups = defaultdict(list)
    for r in records:
        if r["bench"] in ("train_step", "sampler"):
            onednn = r.get("machine", {}).get("onednn", "default")
            groups[(r["bench"], r["batch"], r["precision"], r["jit_compile"], onednn)].append(r)
    lines = ["| what | batch | precision | XLA | images/s | GFLOP/s | of 3x3 ceiling "
             "| peak RSS MiB | vs official fp32 | runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for batch, base in sorted(baseline.items()):
        for what, key in (("official train step", "train"),
                          ("official score evaluation", "score")):
            lines.append(f"| {what} | {batch} | fp32 | – | {base[key]:.2f} | – | – | – | 1.00× "
                         f"| {base['runs']} |")
    # Within a configuration, TensorFlow's default oneDNN setting first.
    order = sorted(groups, key=lambda k: (*k[:4], k[4] != "default", k[4]))
    for (bench, batch, precision, jit, onednn) in order:
        rows = groups[(bench, batch, precision, jit, onednn)]
        key = "images_per_s" if bench == "train_step" else "score_images_per_s"
        speed = _median([x[key] for x in rows])
        gflops = _median([x["gflop_per_s"] for x in rows])
        fractions = [x["fraction_of_ceiling"] for x in rows if "fraction_of_ceiling" in x]
        fraction = f"{_median(fractions):.0%}" if fractions else "–"
        memory = max(x["peak_rss_mib"] for x in rows)
        base = baseline.get(batch, {}).get("train" if bench == "train_step" else "score")
        ratio = f"{speed / base:.2f}×" if base else "–"
        what = "train step" if bench == "train_step" else "score evaluation"
        if onednn != "default":
            what += f" (TF_ENABLE_ONEDNN_OPTS={onednn})"
        lines.append(f"| {what} | {batch} | {precision} | {'on' if jit else 'off'} "
                     f"| {speed:.2f} | {gflops:.0f} | {fraction} | {memory:.0f} | {ratio} "
                     f"| {len(rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help=".jsonl files written with --output")
    args = parser.parse_args(argv)
    table = throughput_table(read(args.paths))
    print(table)
    return table


if __name__ == "__main__":
    main()
