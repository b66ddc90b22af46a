"""A small, realistic work folder for the GPU benchmarks: real catalog text, drawn 448x448 images, stages 3-5.

The CDN behind the real catalog's image links cannot be reached, so each row gets a drawn product photo
(448x448 JPEG: a coloured product shape, a label with the item name) written where stage 2 would put it
(WORK/resized/{split}/ with its manifest). Then the pipeline's own stages run:
3_create_jsonl.py, 4_preprocess.py (--min/max-pixels 200704: every image is 448x448 = 256 image tokens) and
5_convert.py. Train/validation are encoded with --train-max-length, test with --test-max-length.

    python bench/gpu_make_data.py --model /tmp/qwen25vl3b-random --root /tmp/bench --train-rows 640 --test-rows 640
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
PIXELS = 448 * 448


def draw(sample_id: str, title: str) -> Image.Image:
    h = hashlib.sha256(sample_id.encode()).digest()
    bg = tuple(200 + b % 56 for b in h[:3])
    fg = tuple(h[3:6])
    img = Image.new("RGB", (448, 448), bg)
    d = ImageDraw.Draw(img)
    x0, y0 = 60 + h[6] % 60, 50 + h[7] % 60
    x1, y1 = 448 - 60 - h[8] % 60, 448 - 90 - h[9] % 60
    (d.ellipse if h[10] % 2 else d.rectangle)((x0, y0, x1, y1), fill=fg, outline=(0, 0, 0), width=3)
    d.rectangle((x0 + 20, (y0 + y1) // 2 - 25, x1 - 20, (y0 + y1) // 2 + 25), fill=(255, 255, 255))
    words = title.split()
    d.text((x0 + 26, (y0 + y1) // 2 - 18), " ".join(words[:3])[:28], fill=(0, 0, 0))
    d.text((x0 + 26, (y0 + y1) // 2 + 2), " ".join(words[3:6])[:28], fill=(0, 0, 0))
    for k in range(12):  # some texture, so JPEG and the vision tower see more than flat colour
        a, b = h[11 + k % 20], h[12 + k % 19]
        d.line((a * 448 // 256, 448 - 40, b * 448 // 256, 448 - 5), fill=fg, width=2)
    return img


def write_split(rows: pd.DataFrame, data_dir: Path, work: Path, split: str) -> None:
    out = work / "resized" / split
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["sample_id", "status", "file", "width", "height"])
        for r in rows.itertuples(index=False):
            sid = str(r.sample_id)
            title = str(r.catalog_content).split("\n", 1)[0].replace("Item Name:", "").strip()
            draw(sid, title).save(out / f"{sid}.jpg", "JPEG", quality=92)
            w.writerow([sid, "ok", f"{sid}.jpg", 448, 448])
    cols = ["sample_id", "catalog_content", "image_link"] + (["price"] if split == "train" else [])
    rows[cols].to_csv(data_dir / f"{split}.csv", index=False)


def stage(log, *args: str) -> None:
    started = time.time()
    cmd = [sys.executable, *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"  {args[0]}: {time.time() - started:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (tokenizer + preprocessor_config.json)")
    ap.add_argument("--root", type=Path, required=True, help="writes ROOT/dataset and ROOT/work")
    ap.add_argument("--catalog", type=Path, default=ROOT / "bench" / "assets" / "real_catalog_2k.csv")
    ap.add_argument("--train-rows", type=int, default=640)
    ap.add_argument("--test-rows", type=int, default=640)
    ap.add_argument("--validation-split-ratio", type=float, default=0.05)
    ap.add_argument("--train-max-length", type=int, default=768)
    ap.add_argument("--test-max-length", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    started = time.time()
    cat = pd.read_csv(args.catalog, dtype={"sample_id": str, "catalog_content": str, "image_link": str})
    if args.train_rows + args.test_rows > len(cat):
        raise SystemExit(f"{args.catalog} has {len(cat)} rows")
    data, work = args.root / "dataset", args.root / "work"
    data.mkdir(parents=True, exist_ok=True)
    write_split(cat.iloc[:args.train_rows], data, work, "train")
    write_split(cat.iloc[len(cat) - args.test_rows:], data, work, "test")
    print(f"images: {time.time() - started:.1f} s", flush=True)
    px = ["--min-pixels", str(PIXELS), "--max-pixels", str(PIXELS), "--model", args.model, "--work-dir", str(work),
          "--workers", str(args.workers)]
    with open(args.root / "stages.log", "w") as log:
        stage(log, "3_create_jsonl.py", "--data-dir", str(data), "--work-dir", str(work),
              "--validation-split-ratio", str(args.validation_split_ratio))
        for split in ("train", "validation"):
            stage(log, "4_preprocess.py", "--split", split, "--max-length", str(args.train_max_length), *px)
        stage(log, "4_preprocess.py", "--split", "test", "--max-length", str(args.test_max_length), *px)
        stage(log, "5_convert.py", "--work-dir", str(work), "--samples-per-shard", "128")
    summary = {"seconds": round(time.time() - started, 1)}
    for split in ("train", "validation", "test"):
        st = json.loads((work / "preprocessed" / split / "stats.json").read_text())
        lengths = []
        for meta in (work / "preprocessed" / split).glob("*/meta.json"):
            lengths.append(json.loads(meta.read_text())["input_ids_shape"][0])
        lengths.sort()
        summary[split] = {"samples": len(lengths), "counts": st["counts"], "notes": st["notes"],
                          "tokens_median": lengths[len(lengths) // 2] if lengths else None,
                          "tokens_mean": round(sum(lengths) / len(lengths), 1) if lengths else None,
                          "tokens_max": lengths[-1] if lengths else None}
    (args.root / "data_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
