"""Stage 1: download every row's image.

Reads   DATA_DIR/{train,test}.csv          (sample_id, catalog_content, image_link[, price])
Writes  WORK_DIR/images/{split}/SAMPLE_ID.EXT   the verified original bytes, named by sample_id
        WORK_DIR/images/{split}/manifest.csv    one row per input row: status ok | skipped | <reason>
        WORK_DIR/images/{split}/stats.json      counts per status, timings, the resolved options

    python 1_download.py --data-dir dataset --work-dir work --concurrency 64

A rerun skips images already on disk and URLs that failed for good (404, not an image, too large, ...);
it tries again only what may succeed (timeouts, 5xx, 429, truncated bodies), unless --retry-failed. A row
whose image_link changed is fetched again. Ctrl-C stops at once: queued URLs are dropped, the manifest and
stats of what finished are written (exit 130), and a rerun resumes.
Only public http(s) hosts are fetched: other schemes are `bad_url`; link-local hosts (cloud metadata) are
always `blocked_host`, and so are loopback, private and reserved ones unless --allow-private-hosts.
Every CSV is checked before the first download.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import layout, logs, options
from common.data.catalog import read_catalog
from common.data.download import FetchPolicy
from common.fsio import write_json
from common.data.image_store import Interrupted, download_split
from common.data.parts import Part, part_problems


@dataclass
class DownloadOptions:
    data_dir: Path = options.opt("folder holding train.csv and test.csv", Path("dataset"))
    work_dir: Path = options.opt("folder every stage writes under", Path("work"))
    split: str = options.opt("which split(s) to download", "all", choices=["train", "test", "all"])
    concurrency: int = options.opt("parallel downloads (threads)", 64)
    timeout_s: float = options.opt("connect and read timeout per request, seconds", 10.0)
    retries: int = options.opt("extra attempts for a failure that may pass (timeout, 5xx, 429, truncated)", 3)
    backoff_s: float = options.opt("first backoff, doubled per attempt, with +-50%% jitter", 0.5)
    max_bytes: int = options.opt("largest body accepted, bytes", 20 * 1024 * 1024)
    max_image_pixels: int = options.opt("larger images are refused as decompression bombs", 89_478_485)
    retry_failed: bool = options.opt("also retry URLs that failed for good in an earlier run", False)
    skip_bad_rows: bool = options.opt("skip train rows with bad ids/prices (counted) instead of failing", False)
    allow_private_hosts: bool = options.opt("also fetch from loopback, private and reserved addresses (a local "
                                            "image server); link-local ones stay refused", False)
    part: str = options.opt("download only part I of N (I/N: one of N machines sharing the work)", "0/1")

    def problems(self) -> list[str]:
        out = []
        if not self.data_dir.is_dir():
            out.append(f"--data-dir {self.data_dir}: no such folder")
        if self.concurrency < 1:
            out.append("--concurrency must be >= 1")
        if self.timeout_s <= 0:
            out.append("--timeout-s must be > 0")
        if self.retries < 0:
            out.append("--retries must be >= 0")
        if self.max_bytes < 1024:
            out.append("--max-bytes must be >= 1024")
        return out + part_problems(self.part)


def main(cfg: DownloadOptions) -> dict:
    log = logs.setup("download")
    policy = FetchPolicy(timeout_s=cfg.timeout_s, retries=cfg.retries, backoff_s=cfg.backoff_s,
                         max_bytes=cfg.max_bytes, max_image_pixels=cfg.max_image_pixels,
                         allow_private_hosts=cfg.allow_private_hosts)
    # every CSV is checked before the first download: a bad test.csv must not wait for the train images
    catalogs = {split: read_catalog(cfg.data_dir / f"{split}.csv", split, cfg.skip_bad_rows)
                for split in layout.resolve_splits(cfg.split)}
    part, all_stats = Part.parse(cfg.part), {}
    for split, catalog in catalogs.items():
        started = time.time()
        out_dir = layout.images_dir(cfg.work_dir, split)
        try:
            counts, stopped = download_split(part.rows(catalog.rows), out_dir, policy, cfg.concurrency,
                                             cfg.retry_failed, part.suffix), None
        except Interrupted as err:  # Ctrl-C: the manifest of what finished is written; the stats follow
            counts, stopped = err.counts, err
        stats = {"split": split, "rows_in": catalog.n_input, "rows_skipped_bad_input": catalog.skipped,
                 "status_counts": counts, "seconds": round(time.time() - started, 2),
                 "options": options.to_jsonable(cfg), "interrupted": stopped is not None}
        write_json(out_dir / f"stats{part.suffix}.json", stats)
        if stopped is not None:
            sys.stderr.write(f"{Path(sys.argv[0]).name}: {split}: {stopped}\n")
            raise SystemExit(130)
        log.info("%s: %d rows -> %s (%.1fs)", split, len(catalog.rows), counts, stats["seconds"])
        all_stats[split] = stats
    return all_stats


if __name__ == "__main__":
    try:
        options.run_stage(main, DownloadOptions, __doc__)
    except KeyboardInterrupt:  # before the downloads began, or a second Ctrl-C while the first was saving
        sys.stderr.write(f"{Path(sys.argv[0]).name}: interrupted; finished images are kept, rerun to resume\n")
        raise SystemExit(130) from None
