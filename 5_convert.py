"""Stage 5: pack stage 4's samples into WebDataset shards, with an index that training plans from.

Reads   WORK_DIR/jsonl/{split}.jsonl (the order), WORK_DIR/preprocessed/{split}/SAMPLE_ID/
Writes  WORK_DIR/webdataset_{split}/{split}-shard-NNNNNN.tar   members per sample: input_ids.npy,
            attention_mask.npy, pixel_values.npy (uint8 patches; absent if text-only), metadata.json
        WORK_DIR/webdataset_{split}/index.json   shards, their sample counts and sample_ids
        WORK_DIR/webdataset_{split}/stats.json

    python 5_convert.py --work-dir work --split all --samples-per-shard 1000

Each shard is written under a temporary name, read back to check it, then renamed. A rerun keeps
shards whose samples are unchanged and rewrites only the rest. With --part I/N a part packs its rows into
SPLIT-part-I-of-N-shard-NNNNNN.tar and index.part-I-of-N.json; --merge-parts N then writes index.json.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from common import layout, logs, options
from common.data.chat_jsonl import read_jsonl
from common.fsio import write_json
from common.data.parts import Part, part_problems
from common.data.shards import merge_part_indexes, pack_split


@dataclass
class ConvertOptions:
    work_dir: Path = options.opt("folder every stage writes under", Path("work"))
    split: str = options.opt("which split(s) to pack", "all", choices=["train", "validation", "test", "all"])
    samples_per_shard: int = options.opt("samples per shard", 1000)
    part: str = options.opt("pack only part I of N into shards of its own (I/N, as 1_download.py --part)", "0/1")
    merge_parts: int = options.opt("after N parts: join their indexes into the index.json training reads", 0)

    def problems(self) -> list[str]:
        out = part_problems(self.part)
        if self.samples_per_shard < 1:
            out.append("--samples-per-shard must be >= 1")
        if self.merge_parts < 0 or (self.merge_parts and self.part != "0/1"):
            out.append("--merge-parts N (N >= 1) runs once, after every part, without --part")
        for split in layout.resolve_splits(self.split, layout.JSONL_SPLITS):
            if not layout.preprocessed_dir(self.work_dir, split).is_dir():
                out.append(f"{layout.preprocessed_dir(self.work_dir, split)} not found: run 4_preprocess.py first")
        return out


def main(cfg: ConvertOptions) -> dict:
    log = logs.setup("convert")
    part, all_stats = Part.parse(cfg.part), {}
    for split in layout.resolve_splits(cfg.split, layout.JSONL_SPLITS):
        started = time.time()
        out_dir = layout.shards_dir(cfg.work_dir, split)
        if cfg.merge_parts:
            all_stats[split] = merge_part_indexes(out_dir, split, cfg.merge_parts)
            log.info("%s: %s", split, all_stats[split])
            continue
        rows = read_jsonl(layout.jsonl_path(cfg.work_dir, split))
        result = pack_split(rows, layout.preprocessed_dir(cfg.work_dir, split), out_dir, split,
                            cfg.samples_per_shard, part)
        missing = result["missing_ids"]
        warning = missing and (
            f"{split}: {len(missing)} of {len(rows)} rows missing from stage 4 (first ids {', '.join(missing[:5])}): "
            f"they are in no shard{', so stage 7 answers them with the training median' if split == 'test' else ''}"
            f"; why: {layout.preprocessed_dir(cfg.work_dir, split) / 'stats.json'} (or rerun 4_preprocess.py)")
        stats = {"split": split, "rows_in": len(rows), **result, "seconds": round(time.time() - started, 2),
                 "bytes_per_sample": round(result["bytes"] / max(1, result["samples"])),
                 "missing_warning": warning or None, "options": options.to_jsonable(cfg)}
        write_json(out_dir / f"stats{part.suffix}.json", stats)
        log.info("%s: %d rows -> %d samples in %d shards (%d written, %d kept), %d missing from stage 4",
                 split, len(rows), result["samples"], result["shards"], result["shards_written"],
                 result["shards_reused"], result["missing_from_stage4"])
        if warning:
            log.warning("%s", warning)  # after the progress bar, so it is not lost
        all_stats[split] = stats
    return all_stats


if __name__ == "__main__":
    options.run_stage(main, ConvertOptions, __doc__)
