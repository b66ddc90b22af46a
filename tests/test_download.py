"""Stage 1 against a real loopback server: every injected fault ends as its status, reruns resume.

The fault run below downloads one catalog holding every fault route once, then reruns it, so that each
fault's status, the retry rules and the rerun rules are checked on one real run of `1_download.main`.
"""
from __future__ import annotations

import csv
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from common.data.download import RETRYABLE, FetchPolicy, fetch
from common.fsio import is_temp_name
from common.data.image_store import JOURNAL, read_manifest
from common.demo.imageserver import ImageServer
from conftest import ROOT, load_stage, small_jpeg, stage_options, write_csv_rows

TIMEOUT_S = 0.5
SLOW_S = 2.0        # the server's delay on /fault/slow/, well past TIMEOUT_S
RETRIES = 2         # flaky500 fails twice, then succeeds on the third attempt
MAX_BYTES = 64 * 1024

# sample_id -> (path on the server, expected status, attempts on the first run or None to skip the check)
CASES = {
    "ok_a":      ("/img/a.jpg", "ok", 1),
    "dup_1":     ("/img/b.jpg", "ok", None),
    "dup_2":     ("/img/b.jpg", "ok", None),
    "dup_3":     (" /img/b.jpg ", "ok", None),     # same URL once stripped
    "png":       ("/img/c.png", "ok", 1),
    "e404":      ("/fault/404/a.jpg", "http_404", 1),
    "e500":      ("/fault/500/a.jpg", "http_5xx", RETRIES + 1),
    "flaky":     ("/fault/flaky500/a.jpg", "ok", 3),
    "r429":      ("/fault/429/a.jpg", "ok", 2),
    "slow":      ("/fault/slow/a.jpg", "timeout", RETRIES + 1),
    "trunc":     ("/fault/truncated/noise.jpg", "truncated", RETRIES + 1),
    "html":      ("/fault/notimage/a.jpg", "not_image", 1),
    "huge":      ("/fault/oversized/a.jpg", "too_large", 1),
    "big":       ("/img/big.jpg", "too_large", 1),   # a real image over --max-bytes
    "bomb":      ("/fault/bomb/a.png", "decompression_bomb", 1),
    "loop":      ("/fault/redirect/a.jpg", "too_many_redirects", 1),
    "missing":   ("/img/nope.jpg", "http_404", 1),
    "nolink":    ("", "no_link", None),
    "badurl":    ("not a url", "bad_url", None),
}
PERMANENT = [s for s, (_, st, _) in CASES.items() if st != "ok" and st not in RETRYABLE]
RETRYABLE_IDS = [s for s, (_, st, _) in CASES.items() if st in RETRYABLE]


def noise_jpeg(path: Path, size=(256, 256)) -> bytes:
    img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    img.save(path, "JPEG", quality=95)
    return path.read_bytes()


def _link(server: ImageServer, path: str) -> str:
    if not path.strip().startswith("/"):
        return path
    return path.replace(path.strip(), server.url(path.strip()))


def write_catalog(folder: Path, server: ImageServer, cases: dict) -> None:
    rows = [{"sample_id": sid, "catalog_content": f"Item Name: {sid}\n", "image_link": _link(server, p),
             "price": "9.99"} for sid, (p, _, _) in cases.items()]
    write_csv_rows(folder / "train.csv", rows)
    write_csv_rows(folder / "test.csv", [{k: v for k, v in r.items() if k != "price"} for r in rows[:1]])


def manifest_statuses(images_dir: Path) -> dict[str, str]:
    return {sid: r["status"] for sid, r in read_manifest(images_dir).items()}


def image_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in ("manifest.csv", "stats.json")}


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    """One first run and one rerun of stage 1 over every fault; hits recorded after each."""
    root = tmp_path_factory.mktemp("fault_images")
    data = tmp_path_factory.mktemp("fault_data")
    work = tmp_path_factory.mktemp("fault_work")
    sources = {"a.jpg": small_jpeg(root / "a.jpg"), "b.jpg": small_jpeg(root / "b.jpg", colour=(200, 30, 30)),
               "noise.jpg": noise_jpeg(root / "noise.jpg", (128, 128))}
    Image.new("RGBA", (40, 30), (0, 200, 0, 128)).save(root / "c.png")
    sources["c.png"] = (root / "c.png").read_bytes()
    sources["big.jpg"] = noise_jpeg(root / "big.jpg", (256, 256))
    assert len(sources["big.jpg"]) > MAX_BYTES > len(sources["noise.jpg"]) // 2
    stage = load_stage("1_download")
    with ImageServer(root, slow_s=SLOW_S) as server:
        write_catalog(data, server, CASES)
        cfg = stage_options("1_download", data_dir=data, work_dir=work, split="train", concurrency=len(CASES),
                            allow_private_hosts=True,
                            timeout_s=TIMEOUT_S, retries=RETRIES, backoff_s=0.02, max_bytes=MAX_BYTES)
        images = work / "images" / "train"
        t0 = time.monotonic()
        first = stage.main(cfg)["train"]
        first_seconds = time.monotonic() - t0
        first_manifest = read_manifest(images)
        first_stats = json.loads((images / "stats.json").read_text())
        hits_1 = Counter(server.hits)
        second = stage.main(cfg)["train"]
        hits_2 = Counter(server.hits)
        second_manifest = read_manifest(images)
        yield dict(server=server, root=root, cfg=cfg, images=images, sources=sources, first=first, first_stats=first_stats,
                   first_manifest=first_manifest, first_seconds=first_seconds, hits_1=hits_1,
                   second=second, second_manifest=second_manifest, hits_2=hits_2, stage=stage)


def test_each_fault_ends_with_its_status(fault_run):
    manifest = fault_run["first_manifest"]
    assert list(manifest) == list(CASES)  # one manifest row per input row, in input order
    got = {sid: r["status"] for sid, r in manifest.items()}
    assert got == {sid: st for sid, (_, st, _) in CASES.items()}
    for sid, (_, status, attempts) in CASES.items():
        row = manifest[sid]
        assert row["retryable"] == str(status in RETRYABLE), sid
        if attempts is not None:
            assert int(row["attempts"]) == attempts, (sid, row)
    # a timed-out request is abandoned near the timeout, not after the server's full delay
    assert fault_run["first_seconds"] < (RETRIES + 1) * SLOW_S


def test_ok_files_hold_the_served_bytes(fault_run):
    images, sources, manifest = fault_run["images"], fault_run["sources"], fault_run["first_manifest"]
    files = image_files(images)
    ok = {sid for sid, r in manifest.items() if r["status"] == "ok"}
    assert set(files) == {manifest[sid]["file"] for sid in ok}
    assert files["ok_a.jpg"] == sources["a.jpg"]
    assert files["png.png"] == sources["c.png"]  # the extension follows the decoded format
    for sid in ("dup_1", "dup_2", "dup_3", "flaky", "r429"):
        assert manifest[sid]["file"] == f"{sid}.jpg"
        assert int(manifest[sid]["bytes"]) == len(files[f"{sid}.jpg"])
    assert files["dup_1.jpg"] == files["dup_2.jpg"] == files["dup_3.jpg"] == sources["b.jpg"]
    assert not any(is_temp_name(p.name) for p in images.iterdir())
    assert not (images / JOURNAL.format("")).exists()


def test_identical_urls_are_fetched_once(fault_run):
    hits = fault_run["hits_1"]
    assert hits["/img/b.jpg"] == 1
    assert hits["/img/a.jpg"] == 1
    assert hits["/fault/redirect/a.jpg"] == 6  # the first request + 5 redirects, then given up
    assert hits["/fault/404/a.jpg"] == 1


def test_stats_json_counts_match_the_manifest(fault_run):
    stats = fault_run["first_stats"]
    counts = Counter(r["status"] for r in fault_run["first_manifest"].values())
    assert stats["status_counts"] == dict(counts) == fault_run["first"]["status_counts"]
    assert stats["rows_in"] == len(CASES)
    assert stats["split"] == "train"
    assert stats["options"]["timeout_s"] == TIMEOUT_S
    assert stats["rows_skipped_bad_input"] == {}


def test_rerun_skips_done_and_permanent_but_retries_retryable(fault_run):
    h1, h2 = fault_run["hits_1"], fault_run["hits_2"]
    new = h2 - h1
    paths = {sid: p.strip() for sid, (p, _, _) in CASES.items()}
    for sid in PERMANENT:
        assert new[paths[sid]] == 0, f"{sid}: a permanent failure was requested again"
    for sid in RETRYABLE_IDS:
        assert new[paths[sid]] == RETRIES + 1, f"{sid}: a retryable failure was not tried again"
    ok = [sid for sid, (_, st, _) in CASES.items() if st == "ok"]
    for sid in ok:
        assert new[paths[sid]] == 0, f"{sid}: a finished image was downloaded again"
    second = fault_run["second_manifest"]
    assert {sid for sid, r in second.items() if r["status"] == "skipped"} == set(ok)
    for sid in PERMANENT + RETRYABLE_IDS:
        assert second[sid]["status"] == CASES[sid][1]
    for sid in PERMANENT:
        assert second[sid]["attempts"] == "0"
    # a third run still remembers the permanent failures (the rerun's manifest carries them on)
    assert fault_run["second"]["status_counts"]["skipped"] == len(ok)


def test_retry_failed_requests_permanent_failures_again(fault_run, tmp_path):
    server = fault_run["server"]
    subset = {sid: CASES[sid] for sid in ("ok_a", "e404", "html")}
    data = tmp_path / "data"
    data.mkdir()
    write_catalog(data, server, subset)
    work = tmp_path / "work"
    stage = fault_run["stage"]
    cfg = stage_options("1_download", data_dir=data, work_dir=work, split="train", timeout_s=TIMEOUT_S,
                        retries=0, backoff_s=0.01, allow_private_hosts=True)
    stage.main(cfg)
    before = Counter(server.hits)
    stage.main(cfg)
    assert (Counter(server.hits) - before)["/fault/404/a.jpg"] == 0
    cfg.retry_failed = True
    stage.main(cfg)
    after = Counter(server.hits) - before
    assert after["/fault/404/a.jpg"] == 1 and after["/fault/notimage/a.jpg"] == 1
    assert after["/img/a.jpg"] == 0  # finished images are still skipped
    assert manifest_statuses(work / "images" / "train") == {"ok_a": "skipped", "e404": "http_404",
                                                           "html": "not_image"}


def test_journal_of_a_killed_run_is_honoured(fault_run, tmp_path):
    """A run killed before its manifest leaves a journal; its permanent failures are not fetched again."""
    server = fault_run["server"]
    subset = {sid: CASES[sid] for sid in ("ok_a", "e404", "e500")}
    data = tmp_path / "data"
    data.mkdir()
    write_catalog(data, server, subset)
    images = tmp_path / "work" / "images" / "train"
    images.mkdir(parents=True)
    journal = [{"url": server.url("/fault/404/a.jpg"), "status": "http_404"},
               {"url": server.url("/fault/500/a.jpg"), "status": "http_5xx"}]
    (images / JOURNAL.format("")).write_text("".join(json.dumps(r) + "\n" for r in journal) + '{"url": "cut sh')
    (images / ".ok_a.jpg.abc.tmp").write_bytes(b"half a file")  # a temp file a kill left behind
    before = Counter(server.hits)
    fault_run["stage"].main(stage_options("1_download", data_dir=data, work_dir=tmp_path / "work", split="train",
                                          timeout_s=TIMEOUT_S, retries=0, backoff_s=0.01,
                                          allow_private_hosts=True))
    new = Counter(server.hits) - before
    assert new["/fault/404/a.jpg"] == 0
    assert new["/fault/500/a.jpg"] == 1  # retryable: tried again
    assert new["/img/a.jpg"] == 1
    assert manifest_statuses(images) == {"ok_a": "ok", "e404": "http_404", "e500": "http_5xx"}
    assert sorted(p.name for p in images.iterdir()) == ["manifest.csv", "ok_a.jpg", "stats.json"]


def test_429_waits_for_retry_after(fault_run):
    server = fault_run["server"]
    for name in ("retry_after.jpg", "no_retry.jpg"):  # fresh names: the server's 429 comes on a path's first hit
        small_jpeg(fault_run["root"] / name)
    policy = FetchPolicy(timeout_s=2, retries=1, backoff_s=0.01, allow_private_hosts=True)
    t0 = time.monotonic()
    res = fetch(server.url("/fault/429/retry_after.jpg"), policy)
    waited = time.monotonic() - t0
    assert res.status == "ok" and res.attempts == 2
    assert waited >= 0.95, f"Retry-After: 1 not honoured (retried after {waited:.2f}s)"
    # without retries left, the 429 is reported and marked retryable for a later run
    res = fetch(server.url("/fault/429/no_retry.jpg"), FetchPolicy(timeout_s=2, retries=0, allow_private_hosts=True))
    assert res.status == "http_429" and "http_429" in RETRYABLE


class _BadHandler(http.server.BaseHTTPRequestHandler):
    """Responses no fault route makes: a body that is not the gzip it claims, a non-numeric length,
    a 503 whose Retry-After is not a number or a date."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        return

    def do_GET(self):
        if self.path.startswith("/503"):
            self.send_response(503)
            self.send_header("Retry-After", "soon")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"this is not gzip data" * 8
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if self.path.startswith("/gzip"):
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Content-Length", "abc")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


def test_odd_responses_fail_one_row_not_the_run(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        policy = FetchPolicy(timeout_s=2, retries=1, backoff_s=0.01, allow_private_hosts=True)
        assert fetch(base + "/gzip", policy).status == "bad_response"
        assert fetch(base + "/badlen", policy).status == "not_image"
        res = fetch(base + "/503", policy)
        assert res.status == "http_5xx" and res.attempts == 2
    finally:
        srv.shutdown()
        srv.server_close()


def test_e2e_shared_url_fetched_once_and_failures_listed(small_demo_work):
    url, sids = small_demo_work.shared_url
    assert small_demo_work.stats["hits"][urlsplit(url).path] == 1
    for split in ("train", "test"):
        images = small_demo_work.work_dir / "images" / split
        statuses = manifest_statuses(images)
        assert len(statuses) == len(small_demo_work.demo.rows(split))
        for sid, status in small_demo_work.failing[split].items():
            assert statuses[sid] == status
        assert all(st == "ok" for sid, st in statuses.items() if sid not in small_demo_work.failing[split])
    files = image_files(small_demo_work.work_dir / "images" / "train")
    a, b = (files[n] for n in sorted(files) if n.split(".")[0] in sids)
    assert a == b


# ------------------------------------------------------------------------------ kill -9 mid-run, then resume

def _cli(data: Path, work: Path) -> list[str]:
    return [sys.executable, str(ROOT / "1_download.py"), "--data-dir", str(data), "--work-dir", str(work),
            "--concurrency", "4", "--timeout-s", "5", "--retries", "1", "--backoff-s", "0.02", "--allow-private-hosts"]


def _count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for n in os.listdir(folder) if not n.startswith(".") and n.endswith((".jpg", ".png")))


def _final(work: Path) -> dict[str, dict]:
    out = {}
    for split in ("train", "test"):
        folder = work / "images" / split
        man = read_manifest(folder)
        out[split] = {
            "files": image_files(folder),
            "have_image": {sid for sid, r in man.items() if r["status"] in ("ok", "skipped")},
            "failed": {sid: r["status"] for sid, r in man.items() if r["status"] not in ("ok", "skipped")},
            "leftovers": [n for n in os.listdir(folder) if n.startswith(".")],
        }
    return out


def test_sigkill_mid_run_then_rerun_matches_an_uninterrupted_run(make_demo, tmp_path):
    d = make_demo(train_rows=100, test_rows=10, latency_s=0.02)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed_work, clean_work = tmp_path / "killed", tmp_path / "clean"
    train_images = killed_work / "images" / "train"
    proc = subprocess.Popen(_cli(d.data_dir, killed_work), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while _count_images(train_images) < 15:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    survivors = {n.rsplit(".", 1)[0] for n in os.listdir(train_images)
                 if not n.startswith(".") and n.endswith((".jpg", ".png"))}
    assert 15 <= len(survivors) < 98, "the kill did not land mid-run"
    assert not (train_images / "manifest.csv").exists()

    # the resumed run and an uninterrupted reference run, side by side against the same server
    runs = [subprocess.Popen(_cli(d.data_dir, w), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for w in (killed_work, clean_work)]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err[-2000:]

    a, b = _final(killed_work), _final(clean_work)
    for split in ("train", "test"):
        assert a[split]["files"].keys() == b[split]["files"].keys(), split
        assert a[split]["files"] == b[split]["files"], f"{split}: bytes differ after resume"
        assert a[split]["have_image"] == b[split]["have_image"]
        assert a[split]["failed"] == b[split]["failed"]
        assert a[split]["leftovers"] == [] and b[split]["leftovers"] == []
    assert len(b["train"]["have_image"]) >= 95
    man = read_manifest(train_images)
    assert all(man[sid]["status"] == "skipped" for sid in survivors)  # nothing finished was fetched again
    with open(train_images / "manifest.csv", newline="") as fh:
        assert [r["sample_id"] for r in csv.DictReader(fh)] == [r["sample_id"] for r in d.rows("train")]
