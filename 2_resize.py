"""Stage 2: resize every downloaded image to the size Qwen2.5-VL's processor would choose.

Reads   WORK_DIR/images/{split}/manifest.csv and the images it lists
Writes  WORK_DIR/resized/{split}/SAMPLE_ID.jpg   RGB JPEG, both sides multiples of 28,
                                                 min_pixels <= width*height <= max_pixels
        WORK_DIR/resized/{split}/manifest.csv    per row: ok | skipped | <reason> | no_image:<download status>
        WORK_DIR/resized/{split}/stats.json      counts, timings, options

    python 2_resize.py --work-dir work --min-pixels 200704 --max-pixels 401408 --workers 8

EXIF orientation is applied, alpha flattened on white, grayscale/CMYK converted, decompression bombs
refused. A rerun skips finished images (and redoes those whose download is newer); changing the pixel
bounds needs --force.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from common import layout, logs, options
from common.fsio import write_json
from common.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, FACTOR
from common.data.parts import Part, part_problems
from common.data.resize_store import resize_split


@dataclass
class ResizeOptions:
    work_dir: Path = options.opt("folder every stage writes under", Path("work"))
    split: str = options.opt("which split(s) to resize", "all", choices=["train", "test", "all"])
    min_pixels: int = options.opt("fewest pixels per image (256*28*28: 256 image tokens)", DEFAULT_MIN_PIXELS)
    max_pixels: int = options.opt("most pixels per image (512*28*28: 512 image tokens)", DEFAULT_MAX_PIXELS)
    max_image_pixels: int = options.opt("larger source images are refused as decompression bombs", 89_478_485)
    workers: int = options.opt("resizing processes", os.cpu_count() or 1)
    quality: int = options.opt("JPEG quality of the output", 95)
    draft: bool = options.opt("let JPEG decode at a reduced scale when still larger than the target", True)
    force: bool = options.opt("redo images resized earlier with other bounds", False)
    part: str = options.opt("resize only part I of N (I/N, as 1_download.py --part)", "0/1")

    def problems(self) -> list[str]:
        out = []
        if not self.work_dir.is_dir():  # checked before anything is created under a mistyped path
            out.append(f"--work-dir {self.work_dir}: no such folder (run 1_download.py first)")
        if self.min_pixels < FACTOR * FACTOR:
            out.append(f"--min-pixels must be >= {FACTOR * FACTOR}")
        if self.max_pixels < self.min_pixels:
            out.append("--max-pixels must be >= --min-pixels")
        if self.workers < 1:
            out.append("--workers must be >= 1")
        if not 1 <= self.quality <= 100:
            out.append("--quality must be in 1..100")
        return out + part_problems(self.part)


def main(cfg: ResizeOptions) -> dict:
    log = logs.setup("resize")
    params = {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels, "quality": cfg.quality,
              "max_image_pixels": cfg.max_image_pixels, "use_draft": cfg.draft}
    all_stats = {}
    for split in layout.resolve_splits(cfg.split):
        started = time.time()
        out_dir = layout.resized_dir(cfg.work_dir, split)
        part = Part.parse(cfg.part)
        counts = resize_split(layout.images_dir(cfg.work_dir, split), out_dir, params, cfg.workers, part, cfg.force)
        stats = {"split": split, "status_counts": counts, "seconds": round(time.time() - started, 2),
                 "options": options.to_jsonable(cfg)}
        write_json(out_dir / f"stats{part.suffix}.json", stats)
        log.info("%s: %s (%.1fs)", split, counts, stats["seconds"])
        all_stats[split] = stats
    return all_stats


if __name__ == "__main__":
    options.run_stage(main, ResizeOptions, __doc__)
