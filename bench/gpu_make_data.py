"""A realistic data folder for the GPU benchmarks: the real catalog's text, with a drawn photo for each row.

The CDN behind the real catalog's image links cannot be reached, so each row gets a drawn product photo (448x448
JPEG: a coloured product shape, a label with the item name) in ROOT/images/, and its image_link points at
127.0.0.1:PORT, where bench/gpu_bench.py serves that folder: stages 1-7 then run as a user runs them.

    python bench/gpu_make_data.py --root /tmp/bench --train-rows 512 --test-rows 640 --port 8790
"""
from __future__ import annotations

import argparse
import hashlib
import json
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


def write_split(rows: pd.DataFrame, root: Path, split: str, port: int) -> None:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    links = []
    for r in rows.itertuples(index=False):
        sid = str(r.sample_id)
        title = str(r.catalog_content).split("\n", 1)[0].replace("Item Name:", "").strip()
        draw(sid, title).save(images / f"{sid}.jpg", "JPEG", quality=92)
        links.append(f"http://127.0.0.1:{port}/img/{sid}.jpg")
    rows = rows.assign(image_link=links)
    cols = ["sample_id", "catalog_content", "image_link"] + (["price"] if split == "train" else [])
    (root / "dataset").mkdir(parents=True, exist_ok=True)
    rows[cols].to_csv(root / "dataset" / f"{split}.csv", index=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="writes ROOT/dataset and ROOT/images")
    ap.add_argument("--catalog", type=Path, default=ROOT / "bench" / "assets" / "real_catalog_2k.csv")
    ap.add_argument("--train-rows", type=int, default=512)
    ap.add_argument("--test-rows", type=int, default=640)
    ap.add_argument("--port", type=int, default=8790, help="where the images will be served")
    args = ap.parse_args()
    cat = pd.read_csv(args.catalog, dtype={"sample_id": str, "catalog_content": str, "image_link": str})
    if args.train_rows + args.test_rows > len(cat):
        raise SystemExit(f"{args.catalog} has {len(cat)} rows")
    write_split(cat.iloc[:args.train_rows], args.root, "train", args.port)
    write_split(cat.iloc[len(cat) - args.test_rows:], args.root, "test", args.port)
    print(json.dumps({"train": args.train_rows, "test": args.test_rows, "root": str(args.root)}))


if __name__ == "__main__":
    main()
