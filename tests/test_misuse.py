"""The usual mistakes get one clear line and the right exit code, within seconds: never a hang, never a raw
traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script


def one_line(r: subprocess.CompletedProcess, code: int, text: str) -> str:
    assert r.returncode == code, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if text in line]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("workers", ["2", "1"])
def test_a_missing_model_folder_ends_stage4_at_once(shard_work, workers):
    started = time.monotonic()
    r = run_script("4_preprocess.py", "--work-dir", str(shard_work.work_dir), "--model", "./no-such-model",
                   "--workers", workers, timeout=60)
    assert time.monotonic() - started < 30
    one_line(r, 1, "model folder ./no-such-model not found (or has no config.json)")


def test_a_worker_that_cannot_start_ends_the_pool_at_once():
    from common.workers import WorkerError, map_in_processes
    started = time.monotonic()
    with pytest.raises(WorkerError, match="could not start: ValueError: no tokenizer here"):
        list(map_in_processes(abs, list(range(100)), 2, _failing_setup, ("no tokenizer here",)))
    with pytest.raises(WorkerError, match="a worker failed: TypeError"):
        list(map_in_processes(abs, [1, 2, "three", 4], 2))
    assert time.monotonic() - started < 20
    assert list(map_in_processes(abs, [-1, 2, -3], 2)) == [1, 2, 3]


def _failing_setup(message):
    raise ValueError(message)


def test_model_paths_and_unreachable_hub_ids(shard_work, tmp_path):
    r = run_script("6_train.py", "--work-dir", str(shard_work.work_dir), "--output-dir", str(tmp_path / "t"),
                   "--model", "./no-such-model", timeout=120)
    one_line(r, 1, "model folder ./no-such-model not found (or has no config.json)")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    r = run_script("4_preprocess.py", "--work-dir", str(shard_work.work_dir), "--model", str(empty), timeout=60)
    one_line(r, 1, f"model folder {empty} not found (or has no config.json)")
    r = run_script("4_preprocess.py", "--work-dir", str(shard_work.work_dir), "--model", "nobody/no-such-model",
                   env_extra={"HF_HUB_OFFLINE": "1"}, timeout=60)
    one_line(r, 1, "model nobody/no-such-model is not in the local Hugging Face cache and the hub cannot be reached")


def test_unsloth_where_it_cannot_run_is_one_line(shard_work, tmp_path):
    r = run_script("6_train.py", "--work-dir", str(shard_work.work_dir), "--output-dir", str(tmp_path / "t"),
                   "--backend", "unsloth", timeout=120)
    one_line(r, 2, "--backend unsloth needs")  # an option problem, reported with the others


@pytest.mark.parametrize("args, message", [
    (["--from-stage", "9"], "--from-stage must be 1..7, not 9"),
    (["--from-stage", "5", "--to-stage", "3"], "--from-stage 5 comes after --to-stage 3"),
    (["--ngpu", "0"], "--ngpu must be at least 1"),
    (["--ngpu", "abc"], "--ngpu takes a whole number, not 'abc'"),
    (["--model"], "--model needs a value"),
    (["--model", "--ngpu", "2"], "--model needs a value"),
    (["--no-such-option"], "unknown option --no-such-option"),
])
def test_run_sh_checks_its_options_before_running_anything(tmp_path, args, message):
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "--work-dir", str(tmp_path / "w"), *args], cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=30)
    one_line(r, 2, message)
    assert "Usage" in r.stderr or "Options:" in r.stderr  # the usage follows
    assert not (tmp_path / "w").exists()  # nothing ran


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "somewhere"], "--data-dir needs --model"),
    (["--demo-port", "99999"], "--demo-port must be 1..65535, not 99999"),
])
def test_run_sh_refuses_real_data_without_a_model_and_a_port_out_of_range(tmp_path, args, message):
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "--work-dir", str(tmp_path / "w"), *args], cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=30)
    one_line(r, 2, message)
    assert not (tmp_path / "w").exists()


def test_run_sh_checks_the_options_it_passes_on_before_stage_1(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "--work-dir", str(tmp_path / "w"),
                        "--train-args", "--max-steps 3 --lerning-rate 1e-4"], cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    one_line(r, 2, "unknown option --lerning-rate (did you mean --learning-rate?)")
    assert "run.sh: --args-6" in r.stderr and "== stage" not in r.stdout
    assert not (tmp_path / "w").exists()  # not even the demo catalog


def test_an_unknown_stage_option_is_named_with_its_closest_match(tmp_path):
    r = run_script("1_download.py", "--work-dir", str(tmp_path / "w"), "--concurency", "4", timeout=60)
    one_line(r, 2, "unknown option --concurency (did you mean --concurrency?)")
    assert not (tmp_path / "w").exists()


def test_a_damaged_json_file_is_one_line_naming_it(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    stats = w.work_dir / "jsonl" / "stats.json"
    stats.write_text(stats.read_text()[:40])
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(w.data_dir), "--adapter", "none",
                   "--model", str(w.model_path), timeout=120)
    one_line(r, 1, f"{stats}: not valid JSON")


def test_a_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    """A read-only folder cannot be made on every machine (root writes to it anyway), so the errors are built as
    the OS raises them."""
    import errno

    from common.options import one_line_error
    path = str(tmp_path / "out" / "part.csv")
    for code in (errno.EACCES, errno.EROFS, errno.EISDIR):
        line = one_line_error(OSError(code, os.strerror(code), path))
        assert line is not None and line.startswith(f"{path}: {os.strerror(code)}"), line
    assert one_line_error(OSError(errno.EIO, "I/O error")) is None  # anything else keeps its traceback


def test_run_sh_help_is_the_usage_alone():
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--from-stage" in r.stdout and "pipefail" not in r.stdout


def test_a_damaged_shard_read_by_a_loader_worker_is_one_line(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    victim = sorted((w.work_dir / "webdataset_train").glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:5000])
    r = run_script("6_train.py", "--work-dir", str(w.work_dir), "--max-steps", "3", "--eval-steps", "0",
                   "--batch-size", "2", "--grad-accum", "1", "--workers", "1", timeout=300)
    line = one_line(r, 1, str(victim))
    assert "corrupt or truncated shard" in line


def test_out_of_memory_is_one_line_naming_the_stage_and_batch():
    from common.options import one_line_error
    import torch

    class Cfg:
        def memory_hint(self):
            return " in stage 6 at micro-batch 16 x 1 accumulation"

    line = one_line_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), Cfg())
    assert line.startswith("out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB) in stage 6")
    assert "\n" not in line and "checkpoints are kept" in line
    assert one_line_error(ZeroDivisionError("a bug")) is None  # a bug keeps its traceback
