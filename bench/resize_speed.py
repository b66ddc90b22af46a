"""Resize speed per core: our stage-2 resize vs a plain PIL loop, same images, one process each.

    python bench/resize_speed.py                  # 300 images (60x45 .. 1600x1200, PNG with alpha, gray)
    python bench/resize_speed.py --save           # store the table in bench/runs/resize_speed.json

"ours" is what 2_resize.py does per image: common.data.images.load_resized (JPEG draft decoding, EXIF, alpha
flattened on white, smart_resize target, BICUBIC) + common.data.images.jpeg_bytes at quality 95. "plain" is
Image.open -> convert("RGB") -> resize(BICUBIC) -> save(JPEG, 95) to the same target size, so both make
the same output size and the difference is in how the pixels get there. Both write plain files (the
stage's atomic fsynced write is left out of both). Each side runs `--repeats` times, alternating, and
the best time counts (the first pass warms the page cache).

Two image sets of the same sizes and formats: the demo's own pictures (flat colours, which JPEG stores
in few bits and decodes fast) and "textured" copies (gradients + noise, closer to a product photo's
cost to decode).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from common.demo.catalog import write_demo  # noqa: E402
from common.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, FACTOR, jpeg_bytes, load_resized, smart_resize  # noqa: E402
from results import cpu_device, save, table  # noqa: E402


def ours(src: Path, dst: Path, min_pixels: int, max_pixels: int) -> None:
    img = load_resized(src, min_pixels, max_pixels)
    dst.write_bytes(jpeg_bytes(img, 95))


def plain(src: Path, dst: Path, min_pixels: int, max_pixels: int) -> None:
    img = Image.open(src).convert("RGB")
    th, tw = smart_resize(img.height, img.width, FACTOR, min_pixels, max_pixels)
    img.resize((tw, th), Image.Resampling.BICUBIC).save(dst, "JPEG", quality=95)


def timed(fn, files: list[Path], out: Path, min_pixels: int, max_pixels: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for src in files:
        fn(src, out / (src.stem + ".jpg"), min_pixels, max_pixels)
    return time.perf_counter() - t0


def textured_copy(src: Path, dst: Path, rng: np.random.Generator) -> None:
    """Same size, format and mode as src, but with detail a photo would have."""
    with Image.open(src) as im:
        w, h, mode, fmt = im.width, im.height, im.mode, im.format
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    base = 255 * np.concatenate([x * np.ones_like(y), y * np.ones_like(x), (x + y) / 2], axis=2)
    arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")
        alpha = np.full((h, w), 255, np.uint8)
        alpha[: h // 8, : w // 8] = 0
        img.putalpha(Image.fromarray(alpha, "L"))
    elif mode == "L":
        img = img.convert("L")
    img.save(dst, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def measure(files: list[Path], work: Path, args) -> dict:
    kinds = {}
    megapixels = 0.0
    for f in files:
        with Image.open(f) as im:
            key = f"{im.format} {im.mode}"
            kinds[key] = kinds.get(key, 0) + 1
            megapixels += im.width * im.height / 1e6
    best = {"plain": float("inf"), "ours": float("inf")}
    for r in range(args.repeats):
        for name in ("plain", "ours") if r % 2 == 0 else ("ours", "plain"):
            fn = ours if name == "ours" else plain
            seconds = timed(fn, files, work / name, args.min_pixels, args.max_pixels)
            best[name] = min(best[name], seconds)
            print(f"{work.name}/{name} pass {r}: {len(files) / seconds:.1f} images/s", file=sys.stderr)
    # how far apart the two outputs are, per pixel (0-255), and whether sizes agree
    diffs, same_size, alpha_files = [], 0, 0
    for f in files:
        a = np.asarray(Image.open(work / "ours" / (f.stem + ".jpg")).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(work / "plain" / (f.stem + ".jpg")).convert("RGB"), dtype=np.int16)
        if a.shape == b.shape:
            same_size += 1
            if f.suffix == ".png":
                alpha_files += 1  # transparent corners differ on purpose (white vs the hidden colour)
            else:
                diffs.append(float(np.abs(a - b).mean()))
    return {"n": len(files), "kinds": kinds, "megapixels": megapixels, "best": best, "diffs": diffs,
            "same_size": same_size, "alpha_files": alpha_files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300, help="images per set")
    ap.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS, help="as 2_resize.py")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="as 2_resize.py")
    ap.add_argument("--repeats", type=int, default=3, help="passes of each; the best one counts")
    ap.add_argument("--set", choices=["demo", "textured", "both"], default="both", help="which image set(s)")
    ap.add_argument("--save", action="store_true", help="store the table in bench/runs/resize_speed.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_resize_"))
    measured = {}
    try:
        write_demo(tmp / "demo", "http://127.0.0.1:1", train_rows=int(args.images * 1.1) + 10, test_rows=1, seed=0)
        demo_files = sorted((tmp / "demo" / "images").iterdir())[: args.images]
        if args.set in ("demo", "both"):
            measured["demo"] = measure(demo_files, tmp / "demo_out", args)
        if args.set in ("textured", "both"):
            (tmp / "textured").mkdir()
            rng = np.random.default_rng(0)
            for f in demo_files:
                textured_copy(f, tmp / "textured" / f.name, rng)
            measured["textured"] = measure(sorted((tmp / "textured").iterdir()), tmp / "textured_out", args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    columns = ["image set", "resize", "images", "seconds", "images/s a core", "vs plain", "mean pixel difference"]
    rows = []
    for set_name, m in measured.items():
        for name, label in (("plain", "PIL: open, RGB, resize, JPEG 95"), ("ours", "load_resized + jpeg_bytes")):
            b = m["best"][name]
            rows.append([set_name, label, m["n"], round(b, 2), round(m["n"] / b, 1),
                         round(m["best"]["plain"] / b, 2), 0.0 if name == "plain" else round(float(np.mean(m["diffs"])), 2)])
    print(table(columns, rows))
    if args.save:
        save("resize_speed", f"Stage 2: resizing to {args.min_pixels}..{args.max_pixels} pixels, one process each",
             columns, rows, f"python bench/resize_speed.py --images {args.images}", cpu_device())


if __name__ == "__main__":
    main()
