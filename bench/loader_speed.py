"""Loader samples/s into training batches: stage 5's shards (ShardStream) against the lean path
(JsonlStream: the chat JSONL read and each 448x448 JPEG decoded and encoded per sample), both through a
torch DataLoader with the training collator (common.model.collate.for_tokenizer), 0, 1 and 2 workers.

    python bench/loader_speed.py                  # 256 samples, real catalog text, 448x448 images
    python bench/loader_speed.py --write          # also update the shards section of bench/RESULTS.md

Each configuration reads one epoch in batches of --batch-size; "start-up" is the time to the first batch
(worker start, tokenizer load for the lean path, first samples), "samples/s" the rate after it. Best of
--repeats alternating passes, medians reported. Both paths give the same batches (checked on the first).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shard_common import PIX, device, load_average, make_rows, model_source, table, update_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from common.model.collate import for_tokenizer  # noqa: E402
from common.data.encode import ImageSpec  # noqa: E402
from common.data.jsonl_source import JsonlStream  # noqa: E402
from common.data.encode import load_tokenizer
from common.data.preprocess import preprocess_split  # noqa: E402
from common.data.shards import ShardStream, pack_split  # noqa: E402

# What one H100 consumes today and what the project aims at (FINDINGS.md / the issue), samples/s.
H100 = {"training": (15, 40), "inference": (35, 120)}


def one_epoch(dataset, collate, workers: int, batch_size: int) -> tuple[float, float, int, dict]:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n_rest = 0
    for batch in it:
        n_rest += batch["input_ids"].shape[0]
    t2 = time.perf_counter()
    return t1 - t0, n_rest / (t2 - t1), first["input_ids"].shape[0] + n_rest, first


def run(n: int, per_shard: int, batch_size: int, repeats: int, scratch: Path, worker_counts: list[int]) -> dict:
    model, model_words = model_source(scratch)
    work = scratch / "work"
    rows, text_words = make_rows(work, n)
    preprocess_split(rows, work / "pre", "train", model, 4096, PIX, PIX, workers=1)
    pack_split(rows, work / "pre", work / "shards", "train", per_shard)
    spec = ImageSpec.from_model(model)
    collate = for_tokenizer(load_tokenizer(model))
    makers = {"shards": lambda: ShardStream(work / "shards", spec),
              "lean": lambda: JsonlStream(work / "jsonl" / "train.jsonl", model, spec, 4096, PIX, PIX)}
    firsts, results = {}, {}
    for _ in range(repeats):
        for workers in worker_counts:
            for name, make in makers.items():
                startup, rate, seen, first = one_epoch(make(), collate, workers, batch_size)
                assert seen == n, (name, workers, seen)
                firsts.setdefault(name, first)
                results.setdefault((name, workers), []).append((startup, rate))
    a, b = firsts["shards"], firsts["lean"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "shards and lean batches differ"
    summary = {key: {"startup": float(np.median([s for s, _ in runs])), "rate": float(np.median([r for _, r in runs])),
                     "low": min(r for _, r in runs), "high": max(r for _, r in runs)} for key, runs in results.items()}
    return {"n": n, "per_shard": per_shard, "batch_size": batch_size, "repeats": repeats, "model": model_words,
            "text": text_words, "results": summary, "workers": worker_counts}


def report(r: dict, dev: str, load: str) -> str:
    res = r["results"]
    rows = []
    for workers in r["workers"]:
        lean, ours = res[("lean", workers)], res[("shards", workers)]
        rows.append([workers, f"{lean['startup']:.2f}", f"{lean['rate']:.0f} ({lean['low']:.0f}-{lean['high']:.0f})",
                     f"{ours['startup']:.2f}", f"{ours['rate']:.0f} ({ours['low']:.0f}-{ours['high']:.0f})",
                     f"{ours['rate'] / lean['rate']:.1f}x"])
    best = max(res[("shards", w)]["rate"] for w in r["workers"])
    per_worker = res[("shards", 1)]["rate"]
    lean_best = max(res[("lean", w)]["rate"] for w in r["workers"])
    lean_per_worker = res[("lean", 1)]["rate"]

    cpu_words = f"this {os.cpu_count()}-core machine"

    def verdict(rate: float) -> str:
        parts = []
        for use, (today, aim) in H100.items():
            if rate >= aim:
                parts.append(f"above {use} today ({today}) and aimed ({aim}+)")
            elif rate >= today:
                parts.append(f"above {use} today ({today}) but below the aim ({aim}+)")
            else:
                parts.append(f"below {use} today ({today})")
        return "; ".join(parts)

    def workers_for(rate_per_worker: float, target: int) -> int:
        return max(1, -(-target // max(1e-9, rate_per_worker)))

    return "\n".join([
        "### Loader speed into training batches (`bench/loader_speed.py`)",
        "",
        f"Device: {dev}; {load}. {r['n']} samples of {r['text']}, 448x448 images, {r['model']}; "
        f"{r['per_shard']} samples a shard; torch DataLoader, batch {r['batch_size']}, the training collator "
        f"(`common.model.collate.for_tokenizer`: padding, label mask, mm_token_type_ids, float32 pixel_values "
        f"[1024, 1176] a sample); {r['repeats']} passes, alternating: median samples/s after the first batch "
        "(range in brackets), median start-up = seconds to the first batch.",
        "",
        table(["DataLoader workers", "lean: start-up s", "lean: samples/s", "shards: start-up s",
               "shards: samples/s", "shards vs lean (median)"], rows),
        "",
        f"Against one H100 (training ~{H100['training'][0]} samples/s today, aimed {H100['training'][1]}+; "
        f"inference {H100['inference'][0]}, aimed {H100['inference'][1]}+): the shard loader on "
        f"{cpu_words} gives {best:.0f} samples/s (median, best worker count): {verdict(best)}. "
        f"The lean path gives {lean_best:.0f}: "
        f"{verdict(lean_best)}.",
        f"One worker gives ~{per_worker:.0f} samples/s from shards (lean: {lean_per_worker:.0f}), so "
        f"{workers_for(per_worker, H100['training'][1]):.0f} worker(s) cover the training aim and "
        f"{workers_for(per_worker, H100['inference'][1]):.0f} the inference aim, cores allowing (lean: "
        f"{workers_for(lean_per_worker, H100['training'][1]):.0f} and "
        f"{workers_for(lean_per_worker, H100['inference'][1]):.0f}). Workers share the machine's "
        f"{os.cpu_count()} cores with the main process, which here only counts batches. Both paths hand the "
        "collator float32 pixel_values (4.8 MB a sample, 38 MB a batch): normalizing, `torch.cat` and, with "
        "workers, the copy through shared memory are most of the shard path's time, which is why 1 worker can "
        "be slower than none; the lean path adds the JPEG decode and the tokenizer per sample.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts (1 needed)")
    ap.add_argument("--scratch", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--part", default="loader", choices=["loader", "loader_gpu"],
                    help="which part of the shards section --write fills (loader_gpu: a run on the GPU machine)")
    ap.add_argument("--body-out", type=Path, default=None, help="also write the markdown to this file")
    ap.add_argument("--device-note", default="", help="words added after the device line (which machine)")
    args = ap.parse_args()
    load = load_average()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="loader_speed."))
    try:
        result = run(args.samples, args.samples_per_shard, args.batch_size, args.repeats, scratch,
                     sorted(set(args.workers) | {1}))
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    body = report(result, device() + (f" ({args.device_note})" if args.device_note else ""), load)
    if args.part == "loader_gpu":
        body = body.replace("### Loader speed into training batches", "### Loader speed on the GPU machine's CPUs", 1)
    print(body)
    if args.body_out:
        args.body_out.write_text(body + "\n", encoding="utf-8")
    if args.write:
        update_results(args.part, body)


if __name__ == "__main__":
    main()
