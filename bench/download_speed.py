"""Download speed: our stage-1 downloader vs the usual starter, same URLs, same loopback server.

    python bench/download_speed.py                 # 600 demo images, 50 ms server latency
    python bench/download_speed.py --write         # also update the download section of bench/RESULTS.md

The server (common.demo.imageserver, in its own process) adds `--latency-ms` to every answer, which stands in
for a remote host's round trip. "ours" is common.data.image_store.download_split, the function 1_download.py
runs (threads, keep-alive sessions, a decode check, atomic fsynced writes, a manifest). "starter" is what
a first notebook does: multiprocessing.Pool(processes=cpu_count()) mapping urlopen-and-save over the URLs.
"""
from __future__ import annotations

import argparse
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

import pandas as pd  # noqa: E402

from common.data.catalog import read_catalog  # noqa: E402
from common.demo.catalog import write_demo  # noqa: E402
from common.data.download import FetchPolicy  # noqa: E402
from common.data.image_store import download_split, read_manifest  # noqa: E402
from bench_results import RESULTS, cpu_device, update_section  # noqa: E402
SECTION = "download"


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


def table(res: dict, concurrency: int) -> str:
    n = res["n"]

    def row(label: str, runs: list[dict]) -> str:
        seconds = statistics.median(r["seconds"] for r in runs)
        ok = statistics.median(r["ok"] for r in runs)
        valid = statistics.median(r["valid"] for r in runs)
        return (f"| {label} | {n} | {ok:.0f} | {valid:.0f} | {100 * valid / n:.1f}% | {seconds:.2f} | "
                f"{valid / seconds:.1f} |")

    workers = multiprocessing.cpu_count()
    return "\n".join([
        "| downloader | URLs | reported ok | valid images | success | seconds | valid images/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row(f"starter: `multiprocessing.Pool({workers})` + `urllib.request`", res["results"]["starter"]),
        row(f"ours: `download_split`, {concurrency} threads", res["results"]["ours"]),
    ])


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
    ap.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of {RESULTS}")
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

    lines = ["## Download speed (`bench/download_speed.py`)", "",
             f"Device: {cpu_device()}. Loopback `common.demo.imageserver` in its own process, {args.latency_ms:g} ms "
             f"added to every answer; the same URLs and server for both; median of {args.repeats} run(s). "
             "\"valid images\" decode with PIL; the starter counts any 200 answer as a success.", ""]
    for name, res in measured.items():
        speed = {who: statistics.median(r["valid"] / r["seconds"] for r in runs)
                 for who, runs in res["results"].items()}
        title = ("Clean: demo image URLs only" if name == "clean" else
                 f"With faults: the demo rows as they are, {res['failing_links']} failing links among them")
        lines += [f"**{title}** ({res['n']} URLs)", "", table(res, args.concurrency), "",
                  f"Ours: {speed['ours'] / speed['starter']:.1f}x the starter's valid images/s; "
                  f"{res['same']} files byte-identical between the two.", ""]
    lines.append("Ours also decodes every image before keeping it, fsyncs each file and writes a manifest; "
                 "with faults its time includes retrying the 500s (3 retries, 0.5 s backoff doubling).")
    body = "\n".join(lines)
    print(body)
    if args.write:
        update_section(RESULTS, SECTION, body)
        print(f"\nwritten to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
