"""Misuse of the data stages (1-4): shifted CSV columns, edited inputs on rerun, stages run out of order, Ctrl-C.

Each problem ends as one clear line (or is redone), never as silently wrong or stale output.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.data.catalog import CatalogError, read_catalog
from common.data.image_store import read_manifest
from common.errors import PipelineError
from conftest import (DEMO_PIXELS, FAST_DOWNLOAD, ROOT, load_stage, read_csv_rows, run_script, run_stage4, run_stage5,
                      stage_options, write_csv_rows)

TEST_HEADER = "sample_id,catalog_content,image_link\n"


def _one_error_line(stderr: str, script: str) -> str:
    lines = [line for line in stderr.splitlines() if f"{script}: error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------- 1. shifted columns

def test_unquoted_comma_is_named_not_taken_as_an_index(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text(TEST_HEADER + "t1,Cup,large 12 oz,http://h/1.jpg\nt2,Plate,http://h/2.jpg\n"
                    "t3,Bowl,deep, blue,http://h/3.jpg\n", encoding="utf-8")
    with pytest.raises(CatalogError) as err:
        read_catalog(path, "test")
    msg = str(err.value)
    assert msg.startswith(f"{path}: row 1 has 4 fields, the header has 3 (an unquoted comma?)"), msg
    assert "row(s) 3 (5 fields)" in msg and "\n" not in msg


def test_short_row_is_named_too(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sample_id,catalog_content,image_link,price\na,x,http://h/a.jpg,3\nb,y,http://h/b.jpg\n",
                    encoding="utf-8")
    with pytest.raises(CatalogError, match=r"row 2 has 3 fields, the header has 4"):
        read_catalog(path, "train")


def test_bom_crlf_quoted_commas_and_a_price_column_in_test_csv_still_read(tmp_path):
    path = tmp_path / "test.csv"
    text = ("\ufeffsample_id,catalog_content,image_link,price\r\n"
            't1,"Cup, large\r\n12 oz",http://h/1.jpg,3.5\r\n\r\nt2,Plate,http://h/2.jpg,\r\n')
    path.write_bytes(text.encode("utf-8"))
    cat = read_catalog(path, "test")
    assert cat.rows["sample_id"].tolist() == ["t1", "t2"]
    assert cat.rows["catalog_content"].tolist() == ["Cup, large\r\n12 oz", "Plate"]
    assert cat.rows["image_link"].tolist() == ["http://h/1.jpg", "http://h/2.jpg"]


def test_stage1_stops_on_a_shifted_test_csv_with_one_line(demo, tmp_path):
    rows = demo.rows("test")
    text = TEST_HEADER + "".join(f"{r['sample_id']},Cup,large 12 oz,{r['image_link']}\n" for r in rows[:2])
    (demo.data_dir / "test.csv").write_text(text, encoding="utf-8")
    work = tmp_path / "work"
    r = run_script("1_download.py", "--data-dir", str(demo.data_dir), "--work-dir", str(work),
                   "--allow-private-hosts", timeout=120)
    assert r.returncode == 1
    line = _one_error_line(r.stderr, "1_download.py")
    assert "test.csv: row 1 has 4 fields, the header has 3 (an unquoted comma?)" in line
    assert not (work / "images").exists()  # every CSV is checked before the first download


# --------------------------------------------------------------------------------------------- 2. edited inputs

@pytest.fixture
def stage4_copy(encoded_demo, tmp_path):
    """A private copy of stages 3-4's outputs whose stage 3 can rerun: the data CSVs copied, resized/ linked to
    the original (the JSONL names images by their resolved path, so a rerun gives the same rows)."""
    demo = encoded_demo.copy(tmp_path / "work")
    src = encoded_demo.demo_work
    (demo.work_dir / "resized").symlink_to(src.work_dir / "resized", target_is_directory=True)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "test.csv"):
        shutil.copy(src.data_dir / name, data / name)
    return demo, data


def _stage3(data: Path, work: Path) -> dict:
    return load_stage("3_create_jsonl").main(stage_options("3_create_jsonl", data_dir=data, work_dir=work,
                                                           validation_split_ratio=0.2))


def test_stage4_redoes_a_row_whose_price_changed(stage4_copy):
    demo, data = stage4_copy
    pre = demo.pre_dir("train")
    _stage3(data, demo.work_dir)  # unchanged input: nothing to redo
    stats = run_stage4(demo.work_dir, demo.model_path, split="train")["train"]
    n = len(demo.rows("train"))
    assert stats["counts"] == {"skipped": n}
    shards = run_stage5(demo.work_dir, split="train")["train"]

    victim = demo.rows("train")[3]["sample_id"]
    rows = read_csv_rows(data / "train.csv")
    old = next(r["price"] for r in rows if r["sample_id"] == victim)
    for r in rows:
        if r["sample_id"] == victim:
            r["price"] = "123.45"
    write_csv_rows(data / "train.csv", rows)
    untouched = demo.rows("train")[5]["sample_id"]
    mtime = os.stat(pre / untouched / "meta.json").st_mtime_ns
    _stage3(data, demo.work_dir)
    stats = run_stage4(demo.work_dir, demo.model_path, split="train")["train"]
    assert stats["counts"] == {"skipped": n - 1, "ok": 1} and stats["redone_changed"] == 1
    meta = json.loads((pre / victim / "meta.json").read_text())
    assert meta["price"] == 123.45 != float(old)
    assert os.stat(pre / untouched / "meta.json").st_mtime_ns == mtime
    # stage 5 packs the redone sample's shard again (same ids, new bytes) and keeps the others
    repacked = run_stage5(demo.work_dir, split="train")["train"]
    assert (repacked["shards_written"], repacked["shards_reused"]) == (1, shards["shards"] - 1)
    from common.data.shards import ShardStream
    from common.data.encode import ImageSpec
    stream = ShardStream(demo.work_dir / "webdataset_train", ImageSpec.from_model(demo.model_path), normalize=False)
    assert next(s["price"] for s in stream if s["sample_id"] == victim) == 123.45


def test_stage4_redoes_a_row_whose_image_file_changed(stage4_copy, tmp_path):
    demo, _ = stage4_copy
    pre = demo.pre_dir("test")
    rows = demo.rows("test")
    row = next(r for r in rows if len(r["messages"][1]["content"]) == 2)
    image = Path(row["messages"][1]["content"][0]["image"])
    own = tmp_path / "own" / image.name  # a private image, so the shared one is never touched
    own.parent.mkdir()
    shutil.copy(image, own)
    row["messages"][1]["content"][0]["image"] = str(own)
    (demo.work_dir / "jsonl" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_stage4(demo.work_dir, demo.model_path, split="test")["test"]["counts"] == {
        "skipped": len(rows) - 1, "ok": 1}  # the row names another path: redone
    before = (pre / row["sample_id"] / "pixel_values.npy").read_bytes()
    from PIL import Image
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(own, "JPEG", quality=95)  # same path, new pixels
    stats = run_stage4(demo.work_dir, demo.model_path, split="test")["test"]
    assert stats["counts"] == {"skipped": len(rows) - 1, "ok": 1}
    assert (pre / row["sample_id"] / "pixel_values.npy").read_bytes() != before


def test_stage4_other_encoding_options_need_force(stage4_copy):
    demo, _ = stage4_copy
    pre = demo.pre_dir("test")
    stats_before = (pre / "stats.json").read_bytes()
    meta_before = {sid: (pre / sid / "meta.json").read_bytes() for sid in (r["sample_id"] for r in demo.rows("test"))}
    r = run_script("4_preprocess.py", "--work-dir", str(demo.work_dir), "--model", str(demo.model_path),
                   "--split", "test", "--max-length", "1024", "--min-pixels", str(DEMO_PIXELS["min_pixels"]),
                   "--max-pixels", str(DEMO_PIXELS["max_pixels"]), "--workers", "1", timeout=300)
    assert r.returncode == 1
    assert "--force" in _one_error_line(r.stderr, "4_preprocess.py")
    assert (pre / "stats.json").read_bytes() == stats_before  # stage 6 still reads the options the samples have
    assert {sid: (pre / sid / "meta.json").read_bytes() for sid in meta_before} == meta_before

    stats = run_stage4(demo.work_dir, demo.model_path, split="test", max_length=1024, force=True)["test"]
    assert stats["counts"] == {"skipped": 0, "ok": len(meta_before)} and stats["options"]["max_length"] == 1024
    assert json.loads((pre / "params.json").read_text())["max_length"] == 1024
    # and the new options are now the folder's: a plain rerun with them skips everything
    again = run_stage4(demo.work_dir, demo.model_path, split="test", max_length=1024)["test"]
    assert again["counts"] == {"skipped": len(meta_before)}
    with pytest.raises(PipelineError, match="--force"):
        run_stage4(demo.work_dir, demo.model_path, split="test")


def test_stage1_and_2_redo_a_row_whose_link_changed(demo, tmp_path):
    work = tmp_path / "work"
    run1 = lambda: load_stage("1_download").main(stage_options(  # noqa: E731
        "1_download", data_dir=demo.data_dir, work_dir=work, split="train", **FAST_DOWNLOAD))["train"]
    run2 = lambda: load_stage("2_resize").main(stage_options(  # noqa: E731
        "2_resize", work_dir=work, split="train", workers=1, **DEMO_PIXELS))["train"]
    run1()
    run2()
    images = work / "images" / "train"
    first = read_manifest(images)
    ok = [sid for sid, r in first.items() if r["status"] == "ok"]
    moved, broken, donor = ok[0], ok[1], ok[2]
    rows = demo.rows("train")
    links = {r["sample_id"]: r["image_link"] for r in rows}
    for r in rows:
        if r["sample_id"] == moved:
            r["image_link"] = links[donor]  # another product's image
        if r["sample_id"] == broken:
            r["image_link"] = demo.url(f"/fault/404/{broken}.jpg")
    write_csv_rows(demo.data_dir / "train.csv", rows)
    resized_before = (work / "resized" / "train" / f"{moved}.jpg").read_bytes()

    stats = run1()
    second = read_manifest(images)
    assert second[moved]["status"] == "ok" and second[moved]["image_link"] == links[donor]
    assert (images / second[moved]["file"]).read_bytes() == (images / first[donor]["file"]).read_bytes()
    assert second[broken]["status"] == "http_404" and not list(images.glob(f"{broken}.*"))  # no stale image left
    assert stats["status_counts"]["skipped"] == len(ok) - 2
    counts = run2()["status_counts"]
    assert counts["ok"] == 1 and counts["skipped"] == len(ok) - 2  # only the refetched image is resized again
    assert (work / "resized" / "train" / f"{moved}.jpg").read_bytes() != resized_before


# --------------------------------------------------------------------------------------------- 3. out of order

def test_stage3_before_stage2_is_one_line(demo, tmp_path):
    work = tmp_path / "work"
    load_stage("1_download").main(stage_options("1_download", data_dir=demo.data_dir, work_dir=work,
                                                **FAST_DOWNLOAD))
    r = run_script("3_create_jsonl.py", "--data-dir", str(demo.data_dir), "--work-dir", str(work), timeout=120)
    assert r.returncode == 1
    line = _one_error_line(r.stderr, "3_create_jsonl.py")
    assert "no resized images in" in line and "run 2_resize.py first" in line
    assert not (work / "jsonl").exists()


def test_stage2_before_stage1_leaves_nothing_behind(demo, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = run_script("2_resize.py", "--work-dir", str(work), "--split", "train", "--workers", "1", timeout=120)
    assert r.returncode == 1
    assert "run 1_download.py first" in _one_error_line(r.stderr, "2_resize.py")
    assert list(work.iterdir()) == []  # no resized/train/params.json to trip the next run

    load_stage("1_download").main(stage_options("1_download", data_dir=demo.data_dir, work_dir=work,
                                                split="train", **FAST_DOWNLOAD))
    stats = load_stage("2_resize").main(stage_options("2_resize", work_dir=work, split="train", workers=1,
                                                      **DEMO_PIXELS))["train"]
    assert stats["status_counts"]["ok"] > 0
    assert json.loads((work / "resized" / "train" / "params.json").read_text())["min_pixels"] == \
        DEMO_PIXELS["min_pixels"]


def test_stage2_with_a_mistyped_work_dir_creates_nothing(tmp_path):
    typo = tmp_path / "wrok"
    r = run_script("2_resize.py", "--work-dir", str(typo), timeout=120)
    assert r.returncode == 2 and f"--work-dir {typo}: no such folder" in r.stderr
    assert not typo.exists()


# --------------------------------------------------------------------------------------------- 4. Ctrl-C

def _images(folder: Path) -> int:
    return sum(1 for n in os.listdir(folder) if n.endswith(".jpg")) if folder.is_dir() else 0


def test_ctrl_c_in_stage1_stops_soon_saves_what_finished_and_resumes(make_demo, tmp_path):
    timeout_s = 3.0
    d = make_demo(train_rows=40, test_rows=2, slow_s=1.0)  # each image takes a second
    rows = d.rows("train")
    for r in rows:
        r["image_link"] = d.url("/fault/slow/" + r["image_link"].rsplit("/", 1)[1])
    write_csv_rows(d.data_dir / "train.csv", rows)
    work = tmp_path / "work"
    images = work / "images" / "train"
    cmd = [sys.executable, str(ROOT / "1_download.py"), "--data-dir", str(d.data_dir), "--work-dir", str(work),
           "--split", "train", "--concurrency", "2", "--timeout-s", str(timeout_s), "--retries", "1",
           "--allow-private-hosts"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while _images(images) < 2:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no download finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert waited < timeout_s + 2.0, f"took {waited:.1f}s to stop"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "interrupted:" in line]
    assert len(lines) == 1 and lines[0].endswith("of 40 done; rerun to resume"), err[-3000:]
    done = int(lines[0].split("interrupted: ")[1].split(" ")[0])

    manifest = read_manifest(images)
    assert list(manifest) == [r["sample_id"] for r in rows]
    settled = {sid for sid, r in manifest.items() if r["status"] != "interrupted"}
    finished = {sid for sid, r in manifest.items() if r["status"] == "ok"}
    assert 2 <= len(finished) <= len(settled) == done < 40
    assert {p.name.rsplit(".", 1)[0] for p in images.glob("*.jpg")} == finished
    stats = json.loads((images / "stats.json").read_text())
    assert stats["interrupted"] is True and stats["status_counts"]["interrupted"] == 40 - done

    # the rerun resumes: what finished is skipped, the rest is fetched now (in parallel, to keep the test short)
    again = load_stage("1_download").main(stage_options(
        "1_download", data_dir=d.data_dir, work_dir=work, split="train", concurrency=40, timeout_s=timeout_s,
        retries=1, allow_private_hosts=True))["train"]
    manifest = read_manifest(images)
    assert {sid for sid, r in manifest.items() if r["status"] == "skipped"} == finished
    assert again["status_counts"]["skipped"] == len(finished) and "interrupted" not in again["status_counts"]
    assert again["interrupted"] is False


def test_stage4_warns_when_the_demo_model_meets_a_real_catalog(stage4_copy, tmp_path):
    """--model tiny (stage 4's default) on a catalog that is not the demo's trains a random model on real data:
    one warning says which --model to pass; on the demo's catalog there is none."""
    demo, _ = stage4_copy
    args = ["4_preprocess.py", "--work-dir", str(demo.work_dir), "--model", "tiny", "--split", "test", "--workers",
            "1", "--min-pixels", str(DEMO_PIXELS["min_pixels"]), "--max-pixels", str(DEMO_PIXELS["max_pixels"]),
            "--force"]
    warning = "--model tiny is the demo's random model, and this catalog is not the demo's"
    r = run_script(*args, timeout=300)
    assert r.returncode == 0 and warning not in r.stderr, r.stderr[-3000:]
    stats_path = demo.work_dir / "jsonl" / "stats.json"
    stats = json.loads(stats_path.read_text())
    stats["options"]["data_dir"] = str(tmp_path / "data")  # the CSVs alone: no demo.json
    stats_path.write_text(json.dumps(stats))
    r = run_script(*args, timeout=300)
    assert r.returncode == 0 and warning in r.stderr, r.stderr[-3000:]
