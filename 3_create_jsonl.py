"""Stage 3: turn the catalog and the resized images into chat JSONL (system, user = image + text, assistant).

Reads   DATA_DIR/{train,test}.csv, WORK_DIR/resized/{split}/manifest.csv
Writes  WORK_DIR/jsonl/{train,validation,test}.jsonl   one chat per row; test rows have no assistant turn
        WORK_DIR/jsonl/stats.json                      counts, text-only rows, skipped rows and why,
                                                       the training median price (inference's fallback)

    python 3_create_jsonl.py --data-dir dataset --work-dir work --validation-split-ratio 0.05

Downloads that stage 2 has not resized are an error (run 2_resize.py first); a work folder without downloads
gives text-only chats. A row whose image is missing becomes a text-only chat (test rows are never dropped).
Bad rows (ids, prices) fail with their ids listed, or with --skip-bad-rows are left out of train and counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from common import layout, logs, options
from common.data.catalog import read_catalog
from common.data.chat_jsonl import price_summary, split_validation, to_records, write_jsonl
from common.fsio import write_json
from common.data.resize_store import resized_files


@dataclass
class JsonlOptions:
    data_dir: Path = options.opt("folder holding train.csv and test.csv", Path("dataset"))
    work_dir: Path = options.opt("folder every stage writes under", Path("work"))
    validation_split_ratio: float = options.opt("share of train rows held out for validation", 0.05)
    seed: int = options.opt("seed of the validation split", 42)
    skip_bad_rows: bool = options.opt("leave out train rows with bad ids or prices (counted) instead of failing", False)
    skip_train_without_image: bool = options.opt("leave out train rows whose image is missing (test rows never)", False)

    def problems(self) -> list[str]:
        out = []
        if not self.data_dir.is_dir():
            out.append(f"--data-dir {self.data_dir}: no such folder")
        if not 0 <= self.validation_split_ratio < 1:
            out.append("--validation-split-ratio must be in [0, 1)")
        return out


def main(cfg: JsonlOptions) -> dict:
    log = logs.setup("jsonl")
    started = time.time()
    train = read_catalog(cfg.data_dir / "train.csv", "train", cfg.skip_bad_rows)
    test = read_catalog(cfg.data_dir / "test.csv", "test")
    train_images, test_images = (resized_files(layout.resized_dir(cfg.work_dir, s),
                                               layout.images_dir(cfg.work_dir, s)) for s in ("train", "test"))
    train_rows = train.rows
    without_image = ~train_rows["sample_id"].isin(train_images.keys())
    skipped = dict(train.skipped)
    if cfg.skip_train_without_image and without_image.any():
        skipped["no_image"] = train_rows.loc[without_image, "sample_id"].tolist()
        train_rows = train_rows[~without_image]
    fit, validation = split_validation(train_rows, cfg.validation_split_ratio, cfg.seed)
    parts = {"train": to_records(fit, train_images, True),
             "validation": to_records(validation, train_images, True),
             "test": to_records(test.rows, test_images, False)}
    out_dir = layout.jsonl_dir(cfg.work_dir)
    for split, records in parts.items():
        write_jsonl(layout.jsonl_path(cfg.work_dir, split), records)
    text_only = {s: sum(1 for r in recs if len(r["messages"][1]["content"]) == 1) for s, recs in parts.items()}
    stats = {"rows": {s: len(r) for s, r in parts.items()},
             "input_rows": {"train": train.n_input, "test": test.n_input},
             "text_only_rows": text_only,
             "skipped_train_rows": {reason: len(ids) for reason, ids in skipped.items()},
             "skipped_train_row_ids": skipped,
             "train_median_price": float(fit["price"].median()) if len(fit) else None,
             "train_prices": price_summary(fit["price"].tolist()),
             "seconds": round(time.time() - started, 2), "options": options.to_jsonable(cfg)}
    write_json(out_dir / "stats.json", stats)
    log.info("rows %s, text-only %s, skipped %s", stats["rows"], text_only, stats["skipped_train_rows"])
    return stats


if __name__ == "__main__":
    options.run_stage(main, JsonlOptions, __doc__)
