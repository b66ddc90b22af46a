"""Stage-4 samples/s on this machine: our path against a plain loop calling the HF processor per sample.

    python bench/preprocess_speed.py              # 200 samples, real catalog text, 448x448 JPEGs
    python bench/preprocess_speed.py --save       # store the table in bench/runs/preprocess_speed.json

ours   common.data.preprocess's per-sample work, as 4_preprocess.py runs it: Encoder.encode (chat template
       rendered once per layout, catalog and answer tokenized per sample, image cut into uint8 patches),
       validate, then the sample's folder (input_ids.npy, attention_mask.npy, pixel_values.npy, meta.json)
       written under a temp name and renamed.
plain  per sample: tokenizer.apply_chat_template on the chat, Qwen2VLImageProcessorPil on the image
       (float32 pixel_values [1024, 1176]), the image pads expanded, the tokenizer on the full text, then
       each output saved as .npy in the sample's folder (the seed's layout).
Both in one process, tokenizer/processor loaded beforehand; "encode" leaves the files out. Each side runs
--repeats times, alternating, and the best pass counts. The last row is 4_preprocess's own pool
(--pool-workers, default 2), built as preprocess_split builds it: its start-up (spawn, imports, tokenizer
load in every worker) and its rate afterwards are reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from results import cpu_device, save, table
from shard_common import PIX, PlainHF, make_rows, model_source

import numpy as np  # noqa: E402

from common.data import preprocess  # noqa: E402


def plain_write(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr)
    (folder / "meta.json").write_text(json.dumps(meta))


def timed(fn, rows: list[dict]) -> float:
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        fn(i, row)
    return time.perf_counter() - t0


def _pid_once_ready(_) -> int:
    time.sleep(0.05)
    return os.getpid()


def pool_run(rows: list[dict], out: Path, model: str, workers: int) -> tuple[float, float]:
    """4_preprocess's pool as preprocess_split builds it (spawn, common.data.preprocess._init / _work,
    imap_unordered, chunks of 32): (seconds until every worker has initialised, seconds for the rows)."""
    from multiprocessing import get_context
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    pool = get_context("spawn").Pool(workers, initializer=preprocess._init,
                                      initargs=(model, 4096, PIX, PIX, str(out), "train"))
    try:
        ready: set[int] = set()
        while len(ready) < workers:  # a task runs only after its worker's initializer: all loaded now
            ready |= set(pool.map(_pid_once_ready, range(workers * 2), chunksize=1))
        t1 = time.perf_counter()
        results = list(pool.imap_unordered(preprocess._work, list(enumerate(rows)), chunksize=32))
        t2 = time.perf_counter()
    finally:
        pool.close()
        pool.join()
    assert all(status == "ok" for _, status, _, _ in results) and len(results) == len(rows)
    shutil.rmtree(out, ignore_errors=True)
    return t1 - t0, t2 - t1


def run(n: int, repeats: int, scratch: Path, pool_samples: int, pool_workers: int) -> dict:
    model, model_words = model_source(scratch)
    work = scratch / "work"
    rows, text_words = make_rows(work, max(n, pool_samples))
    bench_rows = rows[:n]
    out = work / "out"

    preprocess._init(model, 4096, PIX, PIX, str(out / "ours"), "train")
    enc, spec = preprocess._worker["encoder"], preprocess._worker["spec"]
    plain = PlainHF(model)

    def ours_encode(i, row):
        preprocess.encode_row(enc, spec, row, i, "train")

    def ours_full(i, row):
        sid, status, _, _ = preprocess._work((i, row))
        assert status == "ok", sid

    def plain_encode(i, row):
        plain(row["messages"])

    def plain_full(i, row):
        plain_write(out / "plain" / row["sample_id"], plain(row["messages"]), {"sample_id": row["sample_id"]})

    # same token ids both ways (checked on every sample once)
    for i, row in enumerate(bench_rows):
        a = preprocess.encode_row(enc, spec, row, i, "train")[0]["input_ids"]
        assert a.tolist() == plain(row["messages"])["input_ids"][0].tolist()[:len(a)], row["sample_id"]

    best = {k: float("inf") for k in ("ours_encode", "plain_encode", "ours_full", "plain_full")}
    fns = {"ours_encode": ours_encode, "plain_encode": plain_encode, "ours_full": ours_full, "plain_full": plain_full}
    for _ in range(repeats):
        for name, fn in fns.items():
            shutil.rmtree(out / "plain", ignore_errors=True)
            shutil.rmtree(out / "ours", ignore_errors=True)
            (out / "ours").mkdir(parents=True)
            best[name] = min(best[name], timed(fn, bench_rows))
    shutil.rmtree(out, ignore_errors=True)
    (out / "ours").mkdir(parents=True)
    timed(ours_full, bench_rows)
    timed(plain_full, bench_rows)
    ours_bytes = sum(p.stat().st_size for p in (out / "ours").rglob("*") if p.is_file())
    plain_bytes = sum(p.stat().st_size for p in (out / "plain").rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)

    startup_s, pool_s = pool_run(rows[:pool_samples], work / "pool", model, pool_workers)
    return {"n": n, "repeats": repeats, "model": model_words, "text": text_words, "best": best,
            "pool_samples": pool_samples, "pool_s": pool_s, "startup_s": startup_s, "pool_workers": pool_workers,
            "ours_bytes": ours_bytes / n, "plain_bytes": plain_bytes / n}


def result_table(r: dict) -> tuple[list[str], list[list]]:
    n, b = r["n"], r["best"]
    rate = {k: n / v for k, v in b.items()}
    pool_rate = r["pool_samples"] / r["pool_s"]
    columns = ["path", "timed", "processes", "samples", "seconds", "samples/s", "vs plain"]
    rows = [["plain: chat template + Qwen2VLImageProcessorPil + tokenizer", "encode", 1, n, b["plain_encode"], 1.0],
            ["ours: Encoder.encode + validate", "encode", 1, n, b["ours_encode"],
             rate["ours_encode"] / rate["plain_encode"]],
            ["plain + .npy files (float32 pixels)", "encode + write", 1, n, b["plain_full"], 1.0],
            ["ours + sample folder (uint8 patches)", "encode + write", 1, n, b["ours_full"],
             rate["ours_full"] / rate["plain_full"]],
            [f"ours: 4_preprocess's pool, after {r['startup_s']:.0f} s start-up", "encode + write", r["pool_workers"],
             r["pool_samples"], r["pool_s"], pool_rate / rate["plain_full"]]]
    return columns, [[p, t, k, m, round(s, 2), round(m / s, 1), round(x, 2)] for p, t, k, m, s, x in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--pool-samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pool-workers", type=int, default=2, help="workers of the 4_preprocess pool row")
    ap.add_argument("--scratch", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--save", action="store_true", help="store the table in bench/runs/preprocess_speed.json")
    args = ap.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="preprocess_speed."))
    try:
        result = run(args.samples, args.repeats, scratch, args.pool_samples, args.pool_workers)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    columns, rows = result_table(result)
    print(table(columns, rows))
    if args.save:
        save("preprocess_speed", "Stage 4: encoding samples (real catalog text, 448x448 JPEGs)", columns, rows,
             f"python bench/preprocess_speed.py --samples {args.samples}", cpu_device())


if __name__ == "__main__":
    main()
