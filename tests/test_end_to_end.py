"""`run.sh` with no data: the whole demo, from nothing to test_out.csv and the report, on a small demo."""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_sh_demo_end_to_end(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    cmd = ["bash", str(ROOT / "run.sh"), "--work-dir", str(work), "--demo-port", str(free_port()),
           "--demo-train-rows", "48", "--demo-test-rows", "12"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    for n in range(1, 8):
        assert f"== stage {n} done" in r.stdout
    assert "test rows out: 12" in r.stdout and "validation SMAPE" in r.stdout
    test_ids = [row["sample_id"] for row in csv.DictReader(open(work / "demo" / "test.csv", newline=""))]
    with open(work / "test_out.csv", newline="") as fh:
        out = list(csv.DictReader(fh))
    assert [row["sample_id"] for row in out] == test_ids
    assert all(math.isfinite(float(row["price"])) and float(row["price"]) > 0 for row in out)
    assert (work / "eval" / "report.md").exists()
    # every stage left a stats.json describing itself
    for path in ["images/train", "resized/train", "jsonl", "preprocessed/train", "webdataset_train", "train",
                 "infer_test"]:
        assert json.loads((work / path / "stats.json").read_text())
    # the image server was stopped with the script
    assert "serving" in (work / "imageserver.log").read_text()


def test_run_sh_stops_at_the_first_failing_stage(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("sample_id,catalog_content\n1,x\n")
    (data / "test.csv").write_text("sample_id,catalog_content,image_link\n1,x,\n")
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "--data-dir", str(data), "--work-dir", str(tmp_path / "w"),
                        "--model", "tiny"],
                       cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "stage 1 (download images) failed" in r.stderr
    assert "missing column(s) image_link, price" in r.stderr
    assert "== stage 2" not in r.stdout
