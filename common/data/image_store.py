"""The downloaded-image folder: which sample has which file, the manifest, and a resumable download.

Files are named `SAMPLE_ID.EXT` and written whole (temp + rename). A journal of finished URLs is appended
as the run goes, so a killed run knows on restart which URLs already failed for good.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from common.data.download import RETRYABLE, FetchPolicy, fetch
from common.fsio import clean_temp_files, is_temp_name, write_bytes, write_text

log = logging.getLogger("download")
MANIFEST_FIELDS = ["sample_id", "image_link", "status", "file", "bytes", "attempts", "retryable"]
JOURNAL = ".journal{}.jsonl"  # {}: the part's suffix


def files_by_id(folder: Path) -> dict[str, str]:
    """sample_id -> file name for every finished image in folder."""
    out = {}
    if folder.is_dir():
        for name in os.listdir(folder):
            if is_temp_name(name) or name.startswith(".") or name.startswith(("manifest", "stats")):
                continue
            stem, _, _ = name.rpartition(".")
            if stem:
                out[stem] = name
    return out


def read_manifest(folder: Path) -> dict[str, dict]:
    """sample_id -> its row, from manifest.csv and every part's manifest.part-I-of-N.csv."""
    rows = {}
    for path in sorted(Path(folder).glob("manifest*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            rows.update((r["sample_id"], r) for r in csv.DictReader(fh))
    return rows


def _final_failures(folder: Path) -> dict[str, str]:
    """url -> reason for URLs an earlier run gave up on for good (manifest and journal)."""
    out = {r["image_link"]: r["status"] for r in read_manifest(folder).values()
           if r["status"] not in ("ok", "skipped") and r["retryable"] == "False"}
    for journal in folder.glob(JOURNAL.format("*")):
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run may be cut short
            if rec["status"] not in RETRYABLE and rec["status"] != "ok":
                out[rec["url"]] = rec["status"]
    return out


def download_split(rows: pd.DataFrame, out_dir: Path, policy: FetchPolicy, concurrency: int,
                   retry_failed: bool = False, suffix: str = "") -> dict[str, int]:
    """Download `rows` (a catalog, or one part of it: `suffix` names its manifest and journal)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = set(rows["sample_id"])
    clean_temp_files(out_dir, lambda name: name.rsplit(".", 1)[0] in ours or name.endswith(suffix + ".csv"))
    have = files_by_id(out_dir)
    gave_up = {} if retry_failed else _final_failures(out_dir)
    status: dict[str, dict] = {}
    by_url: dict[str, list[str]] = {}
    for sid, url in zip(rows["sample_id"], rows["image_link"]):
        url = url.strip()
        if sid in have:
            status[sid] = {"status": "skipped", "file": have[sid], "attempts": 0}
        elif url in gave_up:
            status[sid] = {"status": gave_up[url], "file": "", "attempts": 0}
        else:
            by_url.setdefault(url, []).append(sid)

    journal = open(out_dir / JOURNAL.format(suffix), "a", encoding="utf-8")
    rng = random.Random(0)

    def job(url: str):
        return url, fetch(url, policy, random.Random(rng.random()))

    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(by_url), desc=f"download {out_dir.name}", unit="url", mininterval=1) as bar:
        futures = [pool.submit(job, url) for url in by_url]
        for fut in as_completed(futures):
            url, res = fut.result()
            first, *others = by_url[url]
            if res.status == "ok":
                name = f"{first}.{res.ext}"
                write_bytes(out_dir / name, res.data)
                status[first] = {"status": "ok", "file": name, "attempts": res.attempts, "bytes": len(res.data)}
                for sid in others:  # same URL: one fetch, one copy per sample_id
                    other = f"{sid}.{res.ext}"
                    write_bytes(out_dir / other, res.data)
                    status[sid] = {"status": "ok", "file": other, "attempts": 0, "bytes": len(res.data)}
            else:
                for sid in by_url[url]:
                    status[sid] = {"status": res.status, "file": "", "attempts": res.attempts}
            journal.write(json.dumps({"url": url, "status": res.status}) + "\n")
            journal.flush()
            bar.update(1)
    journal.close()

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for sid, url in zip(rows["sample_id"], rows["image_link"]):
        st = status[sid]
        writer.writerow({"sample_id": sid, "image_link": url.strip(), "status": st["status"],
                         "file": st["file"], "bytes": st.get("bytes", ""), "attempts": st["attempts"],
                         "retryable": st["status"] in RETRYABLE})
    write_text(out_dir / f"manifest{suffix}.csv", buf.getvalue())
    (out_dir / JOURNAL.format(suffix)).unlink()  # the manifest now holds everything the journal knew
    return dict(Counter(st["status"] for st in status.values()))


