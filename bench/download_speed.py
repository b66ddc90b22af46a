"""Download speed: our stage-1 downloader vs the usual starter, same URLs, same loopback server.

    python bench/download_speed.py                 # 600 demo images, 50 ms server latency
    python bench/download_speed.py --save          # store the table in bench/runs/download_speed.json

The server (common.demo.imageserver, in its own process) adds `--latency-ms` to every answer, which stands in
for a remote host's round trip. "ours" is common.data.image_store.download_split, the function 1_download.py
runs (threads, keep-alive sessions, a decode check, atomic fsynced writes, a manifest). "starter" is what
a first notebook does: multiprocessing.Pool(processes=cpu_count()) mapping urlopen-and-save over the URLs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pandas as pd  # noqa: E402

from common.data.catalog import read_catalog  # noqa: E402
from common.demo.catalog import write_demo  # noqa: E402
from common.data.download import FetchPolicy  # noqa: E402
from common.data.image_store import download_split, read_manifest  # noqa: E402
from results import cpu_device, save, table  # noqa: E402


# ------------------------------------------------------------------------------ the starter downloader

def starter_fetch(job: tuple[str, str]) -> bool:
    """The usual first attempt: urlopen, read, write; any exception is a miss."""
    url, path = job
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            data = resp.read()
        with open(path, "wb") as fh:
            fh.write(data)
        return True
    except Exception:
        return False


def run_starter(rows: pd.DataFrame, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True)
    jobs = [(url, str(out_dir / f"{sid}.jpg")) for sid, url in zip(rows["sample_id"], rows["image_link"])]
    t0 = time.perf_counter()
    with multiprocessing.Pool(processes=multiprocessing.cpu_count()) as pool:
        ok = pool.map(starter_fetch, jobs)
    seconds = time.perf_counter() - t0
    return {"ok": sum(ok), "seconds": seconds}


def run_ours(rows: pd.DataFrame, out_dir: Path, concurrency: int, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    counts = download_split(rows, out_dir, FetchPolicy(timeout_s=timeout_s, allow_private_hosts=True), concurrency)
    seconds = time.perf_counter() - t0
    return {"ok": counts.get("ok", 0), "seconds": seconds, "counts": counts}


# ------------------------------------------------------------------------------ the server

def start_server(root: Path, latency_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "common.demo.imageserver", "--root", str(root), "--port", "0",
                             "--latency-ms", str(latency_ms)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"image server did not start: {line!r}")
    return proc, m.group(1)


def valid_images(folder: Path) -> int:
    """Files that decode as images: the starter keeps whatever a 200 answer held (an HTML page too)."""
    from PIL import Image
    n = 0
    for p in folder.iterdir():
        if p.name.startswith(".") or p.suffix not in (".jpg", ".png"):
            continue
        try:
            with Image.open(p) as img:
                img.load()
            n += 1
        except Exception:
            pass
    return n


def scenario(tmp: Path, base_url: str, name: str, n_images: int, args) -> dict:
    """Both downloaders over the same URLs; returns the measured runs."""
    demo = tmp / "demo"
    rows = read_catalog(demo / "train.csv", "train").rows[["sample_id", "image_link"]]
    if name == "clean":
        rows = rows[rows["image_link"].str.contains("/img/")]
    rows = rows.head(n_images).reset_index(drop=True)
    results = {"starter": [], "ours": []}
    for r in range(args.repeats):
        for who in ("starter", "ours") if r % 2 == 0 else ("ours", "starter"):
            out = tmp / f"{name}_{who}_{r}"
            res = run_starter(rows, out) if who == "starter" else run_ours(rows, out, args.concurrency, args.timeout_s)
            res["valid"] = valid_images(out)
            results[who].append(res)
            print(f"{name}/{who} run {r}: {res['ok']}/{len(rows)} reported ok, {res['valid']} valid images, "
                  f"{res['seconds']:.2f}s", file=sys.stderr)
    a, b = tmp / f"{name}_ours_0", tmp / f"{name}_starter_0"
    same = sum(1 for sid, m in read_manifest(a).items()
               if m["file"] and (b / f"{sid}.jpg").exists() and (a / m["file"]).read_bytes() == (b / f"{sid}.jpg").read_bytes())
    for r in range(args.repeats):
        for who in results:
            shutil.rmtree(tmp / f"{name}_{who}_{r}", ignore_errors=True)
    return {"n": len(rows), "results": results, "same": same,
            "failing_links": int((~rows["image_link"].str.contains("/img/")).sum())}


def table_rows(name: str, res: dict, concurrency: int) -> list[list]:
    rows = []
    for who, label in (("starter", f"starter: Pool({multiprocessing.cpu_count()}) + urllib"),
                       ("ours", f"ours: download_split, {concurrency} threads")):
        runs = res["results"][who]
        seconds = statistics.median(r["seconds"] for r in runs)
        valid = statistics.median(r["valid"] for r in runs)
        rows.append([name, label, res["n"], int(valid), round(seconds, 2), round(valid / seconds, 1)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600, help="image URLs to download per scenario")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="delay the server adds to every answer")
    ap.add_argument("--concurrency", type=int, default=64, help="our downloader's threads (1_download's default)")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="per-request timeout for ours")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each downloader; the median is reported")
    ap.add_argument("--scenario", choices=["clean", "faults", "both"], default="both",
                    help="clean: only good image URLs; faults: the demo's rows as they are (~2%% 404/500/HTML "
                         "links, which ours retries with its default backoff)")
    ap.add_argument("--save", action="store_true", help="store the table in bench/runs/download_speed.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_download_"))
    (tmp / "demo" / "images").mkdir(parents=True)
    server, base_url = start_server(tmp / "demo" / "images", args.latency_ms)
    scenarios = ["clean", "faults"] if args.scenario == "both" else [args.scenario]
    try:
        write_demo(tmp / "demo", base_url, train_rows=int(args.images * 1.1) + 10, test_rows=1, seed=0)
        measured = {name: scenario(tmp, base_url, name, args.images, args) for name in scenarios}
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    columns = ["URLs", "downloader", "requested", "valid images", "seconds", "valid images/s"]
    rows = [row for name, res in measured.items() for row in table_rows(name, res, args.concurrency)]
    print(table(columns, rows))
    if args.save:
        save("download_speed", f"Stage 1: image downloads from a loopback server adding {args.latency_ms:g} ms an answer",
             columns, rows, f"python bench/download_speed.py --images {args.images} --latency-ms {args.latency_ms:g}",
             cpu_device())


if __name__ == "__main__":
    main()
