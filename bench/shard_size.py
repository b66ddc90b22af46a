"""Bytes per sample in the shards: the seed's layout (every processor output as .npy, float32
pixel_values [N, 1176]) against ours (uint8 patches [N, 588], int32 ids, uint8 mask), same samples.

    python bench/shard_size.py                # 64 samples, real catalog text, 448x448 images
    python bench/shard_size.py --write        # also update the shards section of bench/RESULTS.md

Both layouts go through the same tar writer (common.data.shards.write_tar), the same number of samples a shard.
Ours is what stages 4-5 write (preprocess_split + pack_split); the seed's is built from the HF processor's
own outputs (bench/shard_common.PlainHF).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from shard_common import PIX, PlainHF, device, make_rows, model_source, seed_files, table, update_results

import numpy as np  # noqa: E402

from common.data.preprocess import preprocess_split  # noqa: E402
from common.data.shards import iter_shard, load_index, pack_split, write_tar  # noqa: E402

FULL_TRAIN = 75_000  # rows in the challenge's train split (and as many in test)


def member_sizes(folder: Path) -> dict[str, float]:
    """Mean payload bytes per sample of each member, over all shards in folder."""
    totals, n = {}, 0
    for shard in sorted(folder.glob("*.tar")):
        for raw in iter_shard(shard):
            n += 1
            for k, v in raw.items():
                if not k.startswith("__"):
                    totals[k] = totals.get(k, 0) + len(v)
    return {k: v / n for k, v in totals.items()}


def run(n: int, per_shard: int, scratch: Path) -> dict:
    model, model_words = model_source(scratch)
    work = scratch / "work"
    rows, text_words = make_rows(work, n)
    pre, ours_dir, seed_dir = work / "pre", work / "ours", work / "seed"
    preprocess_split(rows, pre, "train", model, 4096, PIX, PIX, workers=1)
    packed = pack_split(rows, pre, ours_dir, "train", per_shard)
    plain = PlainHF(model)
    samples, lengths = [], []
    for i, row in enumerate(rows):
        arrays = plain(row["messages"])
        lengths.append(arrays["input_ids"].shape[1])
        samples.append((f"s{i:09d}", seed_files(arrays, {"sample_id": row["sample_id"], "price": row["price"]})))
    seed_bytes = sum(write_tar(seed_dir / f"seed-shard-{k:06d}.tar", samples[k * per_shard:(k + 1) * per_shard])
                     for k in range((len(samples) + per_shard - 1) // per_shard))
    ours_bytes = sum(s["bytes"] for s in load_index(ours_dir)["shards"])
    assert packed["samples"] == n
    return {"n": n, "per_shard": per_shard, "model": model_words, "text": text_words,
            "tokens_mean": float(np.mean(lengths)), "tokens_median": float(np.median(lengths)),
            "tokens_max": int(np.max(lengths)),
            "ours": {"bytes": ours_bytes, "members": member_sizes(ours_dir)},
            "seed": {"bytes": seed_bytes, "members": member_sizes(seed_dir)}}


def report(r: dict) -> str:
    n = r["n"]
    rows = []
    for name, words, key in [("seed", "seed: processor outputs as .npy, float32 pixel_values [1024, 1176]", "seed"),
                             ("ours", "ours: uint8 patches [1024, 588], int32 ids, uint8 mask", "ours")]:
        per = r[key]["bytes"] / n
        m = r[key]["members"]
        rows.append([words, f"{m['pixel_values.npy']:,.0f}", f"{per:,.0f}", f"{per / 1e6:.2f}",
                     f"{per * FULL_TRAIN / 1e9:.1f}", f"{r['seed']['bytes'] / r[key]['bytes']:.2f}x"])
    ratio = r["seed"]["bytes"] / r["ours"]["bytes"]
    return "\n".join([
        "### Bytes per sample in the shards (`bench/shard_size.py`)",
        "",
        f"{n} samples, {r['per_shard']} a shard, each one 448x448 image (1024 patches, 256 image tokens) and "
        f"{r['text']} tokenized with {r['model']}: {r['tokens_mean']:.0f} tokens a sample on average "
        f"(median {r['tokens_median']:.0f}, max {r['tokens_max']}). Bytes are whole tar files divided by the "
        "sample count (tar headers and padding included).",
        "",
        table(["layout", "pixel_values member, bytes", "bytes/sample", "MB/sample", "GB per 75k rows",
               "smaller than seed"], rows),
        "",
        f"Ours is {ratio:.2f}x smaller than the seed's layout and lossless: the readers give back the "
        "processor's float32 pixel_values to within 1e-6 (tests/test_preprocess.py).",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument("--scratch", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = ap.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="shard_size."))
    try:
        result = run(args.samples, args.samples_per_shard, scratch)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    body = report(result)
    print(f"Device: {device()}\n\n{body}")
    if args.write:
        update_results("size", body)


if __name__ == "__main__":
    main()
