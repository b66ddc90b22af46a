"""What the stage benchmarks share: realistic samples and the plain HF way of encoding them.

Realistic means: catalog text from bench/assets/real_catalog_2k.csv tokenized with the real Qwen2.5 tokenizer in
bench/assets/qwen-processor/ (when present; else the demo's catalog and the tiny model), and one 448x448 JPEG per
row at the size stage 2 leaves it (min_pixels = max_pixels = 256*28*28: 1024 patches, 256 image tokens).
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from common.data.chat_jsonl import write_jsonl  # noqa: E402
from common.prompt import build_messages, message_parts  # noqa: E402

ASSETS = ROOT / "bench" / "assets"
QWEN_DIR = ASSETS / "qwen-processor"
REAL_CSV = ASSETS / "real_catalog_2k.csv"
PIX = 256 * 28 * 28  # 200704 = 448 * 448


# --------------------------------------------------------------------------------------------- environment

def model_source(scratch: Path) -> tuple[str, str]:
    """(model folder, words for the report): the real Qwen2.5 tokenizer if bench/assets has it, else tiny."""
    if (QWEN_DIR / "tokenizer.json").exists():
        return str(QWEN_DIR), "the real Qwen2.5 tokenizer and processor config (bench/assets/qwen-processor)"
    from common.demo.tiny import ensure_tiny_model
    return str(ensure_tiny_model(scratch / "tiny")), "the tiny model's tokenizer (bench/assets absent)"


def catalogs(n: int) -> tuple[list[tuple[str, float]], str]:
    """n (catalog text, price) pairs, cycling through the real rows if bench/assets has them."""
    if REAL_CSV.exists():
        with open(REAL_CSV, newline="", encoding="utf-8") as fh:
            rows = [(r["catalog_content"], float(r["price"])) for r in csv.DictReader(fh)]
        rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
        src = f"real catalog rows ({REAL_CSV.name})"
    else:
        from common.demo.catalog import make_rows
        rows = [(r.catalog_content, r.price) for r in make_rows(max(n, 100), 0, 0, False)]
        src = "demo catalog rows (bench/assets absent)"
    return [rows[i % len(rows)] for i in range(n)], src


def photo(seed: int, size: int = 448) -> Image.Image:
    """A product-photo-like picture: light background, a shaded box, a label, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    bg = 235 - 20 * (y / size)
    arr = np.repeat(bg[..., None], 3, axis=2)
    colour = rng.integers(30, 220, 3)
    x0, y0 = rng.integers(40, 140, 2)
    x1, y1 = size - rng.integers(40, 140, 2)
    shade = 0.75 + 0.25 * (x[y0:y1, x0:x1] - x0) / max(1, x1 - x0)
    arr[y0:y1, x0:x1] = colour * shade[..., None]
    arr += rng.normal(0, 4, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for k in range(4):
        yy = y0 + 20 + 18 * k
        draw.rectangle([x0 + 15, yy, x0 + 15 + int(rng.integers(40, max(41, x1 - x0 - 30))), yy + 8],
                       fill=tuple(int(c) for c in 255 - colour))
    return img


def make_rows(work: Path, n: int, split: str = "train") -> tuple[list[dict], str]:
    """n chat rows with 448x448 JPEGs (quality 95, as stage 2 writes), JSONL at work/jsonl/{split}.jsonl."""
    images = work / "resized" / split
    images.mkdir(parents=True, exist_ok=True)
    texts, src = catalogs(n)
    rows = []
    for i, (catalog, price) in enumerate(texts):
        path = images / f"b{i:06d}.jpg"
        if not path.exists():
            photo(i).save(path, "JPEG", quality=95)
        rows.append({"sample_id": f"b{i:06d}", "messages": build_messages(catalog, str(path), price), "price": price})
    write_jsonl(work / "jsonl" / f"{split}.jsonl", rows)
    return rows, src


# --------------------------------------------------------------------------------------------- the plain HF way

class PlainHF:
    """What the usual starter does per sample: chat template on the whole text, the image processor,
    the image pads expanded, the tokenizer on the full text; outputs as the processor returns them."""

    def __init__(self, model_path: str, min_pixels: int = PIX, max_pixels: int = PIX):
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        from common.data.encode import load_tokenizer
        self.tok = load_tokenizer(model_path)
        self.proc = Qwen2VLImageProcessorPil.from_pretrained(model_path)
        self.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}

    def __call__(self, messages: list[dict]) -> dict[str, np.ndarray]:
        _, image, answer = message_parts(messages)
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
        out = {}
        if image is not None:
            px = self.proc(images=[Image.open(image)], size=self.size, return_tensors="np")
            out["pixel_values"], out["image_grid_thw"] = px["pixel_values"], px["image_grid_thw"]
            n = int(np.prod(px["image_grid_thw"])) // self.proc.merge_size ** 2
            text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
        enc = self.tok(text, add_special_tokens=False, return_tensors="np")
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        return out


def seed_files(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, bytes]:
    """The seed's sample layout: every processor output as .npy (float32 pixel_values [N, 1176])."""
    import json

    from common.data.sample_store import npy_bytes
    files = {f"{k}.npy": npy_bytes(v) for k, v in arrays.items()}
    files["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return files
