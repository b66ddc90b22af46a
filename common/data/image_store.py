"""The downloaded-image folder: which sample has which file, the manifest, and a resumable download.

Files are named `SAMPLE_ID.EXT` and written whole (temp + rename). A journal of finished URLs (and the
sample_ids each was saved for) is appended as the run goes, before the files, so a killed run knows on restart
which URLs already failed for good and where every file came from. A file is kept on rerun only while its row's
link is the one it was fetched from (the manifest and journal say which); a changed link is fetched again.
Ctrl-C stops new requests, waits for those under way, writes the manifest and raises `Interrupted`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from common.data.download import RETRYABLE, FetchPolicy, fetch
from common.errors import PipelineError
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


class Interrupted(PipelineError):
    """Ctrl-C during a download: what was finished is in the manifest; `counts` as download_split returns them."""

    def __init__(self, counts: dict[str, int], done: int, total: int):
        super().__init__(f"interrupted: {done} of {total} done; rerun to resume")
        self.counts = counts


def _journal_records(folder: Path) -> list[dict]:
    records = []
    for journal in sorted(folder.glob(JOURNAL.format("*"))):
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run may be cut short
            if isinstance(rec, dict) and "url" in rec and "status" in rec:
                records.append(rec)
    return records


def _final_failures(folder: Path) -> dict[str, str]:
    """url -> reason for URLs an earlier run gave up on for good (manifest and journal)."""
    out = {r["image_link"]: r["status"] for r in read_manifest(folder).values()
           if r["status"] not in ("ok", "skipped") and r["retryable"] == "False"}
    for rec in _journal_records(folder):
        if rec["status"] not in RETRYABLE and rec["status"] != "ok":
            out[rec["url"]] = rec["status"]
    return out


def _fetched_from(folder: Path) -> dict[str, str]:
    """sample_id -> the link its file on disk was fetched from: manifest rows with a file, then the journal of a
    killed later run. A file no record names (written by an older version) is taken as it is."""
    out = {sid: r["image_link"] for sid, r in read_manifest(folder).items() if r.get("file")}
    for rec in _journal_records(folder):
        if rec["status"] == "ok":
            out.update((sid, rec["url"]) for sid in rec.get("ids", []))
    return out


def download_split(rows: pd.DataFrame, out_dir: Path, policy: FetchPolicy, concurrency: int,
                   retry_failed: bool = False, suffix: str = "") -> dict[str, int]:
    """Download `rows` (a catalog, or one part of it: `suffix` names its manifest and journal). On Ctrl-C: the
    manifest of what finished (the rest `interrupted`, retried by a rerun), then `Interrupted`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = set(rows["sample_id"])
    clean_temp_files(out_dir, lambda name: name.rsplit(".", 1)[0] in ours or name.endswith(suffix + ".csv"))
    have = files_by_id(out_dir)
    fetched_from = _fetched_from(out_dir)
    gave_up = {} if retry_failed else _final_failures(out_dir)
    status: dict[str, dict] = {}
    by_url: dict[str, list[str]] = {}
    for sid, url in zip(rows["sample_id"], rows["image_link"]):
        url = url.strip()
        if sid in have and fetched_from.get(sid, url) == url:
            status[sid] = {"status": "skipped", "file": have[sid], "attempts": 0}
            continue
        if sid in have:  # the row's link changed: the old image must not stand in for the new one
            (out_dir / have[sid]).unlink()
            log.info("%s: link changed, fetching it again", sid)
        if url in gave_up:
            status[sid] = {"status": gave_up[url], "file": "", "attempts": 0}
        else:
            by_url.setdefault(url, []).append(sid)

    journal = open(out_dir / JOURNAL.format(suffix), "a", encoding="utf-8")
    rng, stop = random.Random(0), threading.Event()

    def job(url: str):
        return url, fetch(url, policy, random.Random(rng.random()), stop)

    def record(url: str, res) -> None:
        if res.status == "interrupted":
            return  # left for the next run: not journaled, so not taken for a final failure
        ids = by_url[url]
        # the journal line first: every file on disk then has a record of the link it came from
        journal.write(json.dumps({"url": url, "status": res.status, "ids": ids}) + "\n")
        journal.flush()
        if res.status == "ok":
            for n, sid in enumerate(ids):  # same URL: one fetch, one copy per sample_id
                name = f"{sid}.{res.ext}"
                write_bytes(out_dir / name, res.data)
                status[sid] = {"status": "ok", "file": name, "attempts": res.attempts if n == 0 else 0,
                               "bytes": len(res.data)}
        else:
            for sid in ids:
                status[sid] = {"status": res.status, "file": "", "attempts": res.attempts}

    pool = ThreadPoolExecutor(max_workers=concurrency)
    futures, recorded, interrupted = [], set(), False
    try:
        with tqdm(total=len(by_url), desc=f"download {out_dir.name}", unit="url", mininterval=1) as bar:
            futures = [pool.submit(job, url) for url in by_url]
            for fut in as_completed(futures):
                record(*fut.result())
                recorded.add(fut)
                bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()  # requests under way end within about one timeout; queued ones never start
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in futures:
            if fut not in recorded and fut.done() and not fut.cancelled():
                record(*fut.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # all done by now, unless a bug is on its way up
        journal.close()

    for sid in rows["sample_id"]:
        status.setdefault(sid, {"status": "interrupted", "file": "", "attempts": 0})
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
    counts = dict(Counter(st["status"] for st in status.values()))
    if interrupted:
        raise Interrupted(counts, sum(1 for st in status.values() if st["status"] != "interrupted"), len(status))
    return counts
