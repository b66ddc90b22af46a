"""Stage 4: encode every chat into the exact tensors the model reads, one folder per sample.

Reads   WORK_DIR/jsonl/{train,validation,test}.jsonl, the resized images they name, the model's
        tokenizer, chat template and image-processor settings (--model)
Writes  WORK_DIR/preprocessed/{split}/SAMPLE_ID/{input_ids.npy, attention_mask.npy, pixel_values.npy,
        metadata.json}   and   WORK_DIR/preprocessed/{split}/stats.json

    python 4_preprocess.py --work-dir work --model Qwen/Qwen2.5-VL-3B-Instruct --split all --workers 8

Training rows are encoded with their answer, test rows with the assistant turn opened, exactly as
inference will see them. `pixel_values.npy` holds the processor's patches as uint8 (4x smaller than
float32, lossless: readers normalize them back to the processor's float32 values). --max-length cuts
the catalog text only. A rerun skips finished samples whose input (JSONL row, image file, options) is
unchanged and redoes the others; other encoding options for a split need --force (as stage 2's bounds).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from common import layout, logs, options
from common.data.chat_jsonl import read_jsonl
from common.fsio import write_json
from common.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from common.demo.catalog import is_demo_work
from common.model.loading import check_model_files, resolve_model
from common.data.parts import Part, part_problems
from common.data.preprocess import preprocess_split
from common.data.sample_store import clean_partial


@dataclass
class PreprocessOptions:
    work_dir: Path = options.opt("folder every stage writes under", Path("work"))
    split: str = options.opt("which split(s) to encode", "all", choices=["train", "validation", "test", "all"])
    model: str = options.opt("tokenizer/processor source: tiny | LOCAL_DIR | HUB_ID", "tiny")
    min_pixels: int = options.opt("fewest pixels per image; use stage 2's value", DEFAULT_MIN_PIXELS)
    max_pixels: int = options.opt("most pixels per image; use stage 2's value", DEFAULT_MAX_PIXELS)
    max_length: int = options.opt("most tokens per sample; longer catalog text is cut", 2048)
    workers: int = options.opt("encoding processes (1: in this process)", os.cpu_count() or 1)
    part: str = options.opt("encode only part I of N (I/N, as 1_download.py --part)", "0/1")
    force: bool = options.opt("redo a split encoded earlier with other options (model, lengths, pixels)", False)

    def problems(self) -> list[str]:
        out = []
        if self.max_length < 64:
            out.append("--max-length must be >= 64")
        if self.max_pixels < self.min_pixels:
            out.append("--max-pixels must be >= --min-pixels")
        if self.workers < 1:
            out.append("--workers must be >= 1")
        for split in layout.resolve_splits(self.split, layout.JSONL_SPLITS):
            if not layout.jsonl_path(self.work_dir, split).exists():
                out.append(f"{layout.jsonl_path(self.work_dir, split)} not found: run 3_create_jsonl.py first")
        return out + part_problems(self.part)


def main(cfg: PreprocessOptions) -> dict:
    log = logs.setup("preprocess")
    if cfg.model == "tiny" and not is_demo_work(cfg.work_dir):
        log.warning("--model tiny is the demo's random model, and this catalog is not the demo's: pass --model "
                    "Qwen/Qwen2.5-VL-3B-Instruct (or a local copy) to train the real one")
    model_path = resolve_model(cfg.model, cfg.work_dir)
    check_model_files(model_path)  # here, once, rather than failing in every worker
    part, all_stats = Part.parse(cfg.part), {}
    for split in layout.resolve_splits(cfg.split, layout.JSONL_SPLITS):
        started = time.time()
        rows = read_jsonl(layout.jsonl_path(cfg.work_dir, split))
        out_dir = layout.preprocessed_dir(cfg.work_dir, split)
        clean_partial(out_dir, part.has)
        result = preprocess_split(rows, out_dir, split, model_path, cfg.max_length, cfg.min_pixels,
                                  cfg.max_pixels, cfg.workers, part, cfg.force)
        stats = {"split": split, "rows_in": sum(1 for r in rows if part.has(r["sample_id"])), **result, "model_path": model_path,
                 "seconds": round(time.time() - started, 2), "options": options.to_jsonable(cfg)}
        write_json(out_dir / f"stats{part.suffix}.json", stats)
        log.info("%s: %d rows -> %s, notes %s (%.1fs)", split, len(rows), result["counts"], result["notes"],
                 stats["seconds"])
        all_stats[split] = stats
    return all_stats


if __name__ == "__main__":
    options.run_stage(main, PreprocessOptions, __doc__)
