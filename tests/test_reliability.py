"""Kill it anywhere, feed it garbage: nothing is lost, nothing is silently wrong."""
from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, load_stage, run_script
from test_end_to_end import free_port

SMALL_DEMO = ["--demo-train-rows", "32", "--demo-test-rows", "10"]


def run_sh(work: Path, port: int) -> list[str]:
    return ["bash", str(ROOT / "run.sh"), "--work-dir", str(work), "--demo-port", str(port), *SMALL_DEMO]


def digest(work: Path) -> dict[str, str]:
    """Content hashes of what the pipeline promises to reproduce (JSONL with the work dir taken out)."""
    out = {}
    for split in ("train", "validation", "test"):
        text = (work / "jsonl" / f"{split}.jsonl").read_text().replace(str(work.resolve()), "WORK")
        out[f"jsonl/{split}"] = hashlib.sha256(text.encode()).hexdigest()
        for tar in sorted((work / f"webdataset_{split}").glob("*.tar")):
            out[f"{split}/{tar.name}"] = hashlib.sha256(tar.read_bytes()).hexdigest()
    out["test_out.csv"] = hashlib.sha256((work / "test_out.csv").read_bytes()).hexdigest()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7, 2026])
def test_kill_minus_9_in_every_stage_then_rerun_gives_the_same_outputs(tmp_path, seed):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    clean = tmp_path / "clean"
    r = subprocess.run(run_sh(clean, free_port()), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]

    killed, port, rng = tmp_path / "killed", free_port(), random.Random(seed)
    hit = []
    for stage in range(1, 8):
        proc = subprocess.Popen(run_sh(killed, port), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        for line in proc.stdout:
            if line.startswith(f"== stage {stage}:"):
                time.sleep(rng.uniform(0.0, 1.5))  # somewhere inside the stage (or just after it)
                break
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            hit.append(stage)
        proc.wait()
    assert len(hit) >= 5  # most kills landed while the pipeline was still running
    leftovers = [p for p in killed.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
    r = subprocess.run(run_sh(killed, port), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert not [p for p in killed.rglob("*") if p.name.startswith(".") and ".tmp" in p.name and p.exists()
                and p not in leftovers and "models" not in str(p)]
    assert digest(killed) == digest(clean)


def test_broken_jsonl_line_is_named(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    path = w.work_dir / "jsonl" / "validation.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    path.write_text("\n".join(lines) + "\n")
    r = run_script("4_preprocess.py", "--work-dir", str(w.work_dir), "--split", "validation", "--workers", "1")
    assert r.returncode == 1
    assert f"{path}:2: broken JSONL row" in r.stderr and "Traceback" not in r.stderr


def test_truncated_jpeg_in_resized_is_detected_and_counted(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    rows = [json.loads(l) for l in open(w.work_dir / "jsonl" / "test.jsonl")]
    victim = next(r for r in rows if len(r["messages"][1]["content"]) == 2)
    image_part = victim["messages"][1]["content"][0]
    original = Path(image_part["image"])  # shared with other tests: damage a copy, never the original
    damaged = w.work_dir / "damaged" / original.name
    damaged.parent.mkdir()
    damaged.write_bytes(original.read_bytes()[: original.stat().st_size // 3])
    image_part["image"] = str(damaged)
    (w.work_dir / "jsonl" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(w.work_dir / "preprocessed" / "test")
    pre = load_stage("4_preprocess")
    stats = pre.main(pre.PreprocessOptions(work_dir=w.work_dir, split="test", workers=1, max_length=512,
                                           min_pixels=12544, max_pixels=25088))["test"]
    assert stats["problem_ids"]["image_dropped:corrupt_image"] == [victim["sample_id"]]
    assert stats["counts"]["ok"] == len(rows)  # the row itself is kept, as text only
    meta = json.loads((w.work_dir / "preprocessed" / "test" / victim["sample_id"] / "meta.json").read_text())
    assert meta["pixel_values_shape"] is None


def test_checkpoint_with_a_missing_file_is_not_resumed_from(shard_work, tmp_path):
    from common.model.checkpoints import latest_complete_checkpoint
    out = tmp_path / "train"
    r = run_script("6_train.py", "--work-dir", str(shard_work.work_dir), "--output-dir", str(out), "--max-steps", "6",
                   "--save-steps", "3", "--eval-steps", "0", "--batch-size", "2", "--grad-accum", "1", "--workers", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest_complete_checkpoint(out).name == "checkpoint-6"
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    assert latest_complete_checkpoint(out).name == "checkpoint-3"
    (out / "checkpoint-3" / "COMPLETE").unlink()
    assert latest_complete_checkpoint(out) is None


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_full_disk_fails_cleanly_and_keeps_finished_outputs(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    before = {p: p.read_bytes() for p in (w.work_dir / "jsonl").glob("*.jsonl")}
    cmd = [sys.executable, str(ROOT / "3_create_jsonl.py"), "--data-dir", str(w.data_dir), "--work-dir",
           str(w.work_dir), "--validation-split-ratio", "0.5"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120)
    assert r.returncode == 1
    assert "out of disk space" in r.stderr and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in (w.work_dir / "jsonl").glob("*.jsonl")} == before
    assert not [p for p in (w.work_dir / "jsonl").iterdir() if ".tmp" in p.name]


def test_hostile_ids_and_catalog_text(tmp_path, shard_work):
    from common.data.catalog import CatalogError, read_catalog
    from common.data.encode import Encoder, ImageSpec
    from common.data.encode import load_tokenizer
    from common.prompt import build_messages
    path = tmp_path / "test.csv"
    path.write_bytes(b'sample_id,catalog_content,image_link\nok,x,\n"x\ny",x,\n"../y",x,\n"a/b",x,\n')
    with pytest.raises(CatalogError) as err:
        read_catalog(path, "test")
    msg = str(err.value)
    assert "unsafe_sample_id" in msg and "'x\\ny'" in msg and "'../y'" in msg and "'a/b'" in msg
    path.write_bytes(b'sample_id,catalog_content,image_link\nok,x,\n"a\x00b",x,\n')
    with pytest.raises(CatalogError, match="NUL byte at line 3"):
        read_catalog(path, "test")
    assert not list(tmp_path.glob("*/")), "nothing may be written for such ids"
    tok = load_tokenizer(shard_work.model_path)
    enc = Encoder(tok, ImageSpec.from_model(shard_work.model_path), max_length=256)
    empty = enc.encode(build_messages("", None, 4.99))
    assert tok.decode(empty["input_ids"][empty["answer_start"]:]) == "4.99<|im_end|>"
    huge = enc.encode(build_messages("Item Name: " + "very long text " * 3400, None, 12.5))  # 50k characters
    assert len(huge["input_ids"]) == 256 and huge["catalog_tokens_dropped"] > 1000
    assert tok.decode(huge["input_ids"][huge["answer_start"]:]) == "12.50<|im_end|>"


NONFINITE_RANK = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from common.model.training import nonfinite_on_any_rank
dist.init_process_group("gloo")
rank = dist.get_rank()
flag = None if {bad} < 0 else torch.tensor(rank == {bad})
print("RESULT", nonfinite_on_any_rank(flag), flush=True)
dist.barrier()
dist.destroy_process_group()  # an exit with the group still up can abort in gloo's teardown
"""


@pytest.mark.parametrize("bad_rank", [1, -1])
def test_a_nan_on_one_rank_stops_every_rank(bad_rank):
    """Rank 0 must not save weights that a NaN on rank 1 reached through the gradient all-reduce."""
    port = free_port()
    code = NONFINITE_RANK.format(root=str(ROOT), bad=bad_rank)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert [o.strip().splitlines()[-1] for o, _ in outs] == [f"RESULT {bad_rank >= 0}"] * 2


@pytest.mark.parametrize("stage", ["1_download.py", "2_resize.py", "3_create_jsonl.py", "4_preprocess.py",
                                   "5_convert.py", "6_train.py", "7_infer.py"])
def test_every_stage_explains_its_options(stage):
    """--help renders every option's text (argparse %-formats help strings; common.options escapes a "3%")."""
    done = run_script(stage, "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--work-dir" in done.stdout
    assert "reads" in done.stdout.lower(), done.stdout[:500]  # the stage's docstring: what it reads and writes


def test_persistent_loader_workers_are_stopped_before_exit():
    """torch 2.11's exit hook joins persistent pinned workers before telling them to stop (5 s each); the stages
    stop every loader's workers first, and a loader used again after that starts new ones."""
    import torch
    from common.speed.loader_exit import stop_loader_workers
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=4, num_workers=2, persistent_workers=True)
    first = [b.tolist() for b in loader]
    workers = loader._iterator._workers
    assert all(w.is_alive() for w in workers)  # persistent: kept after the pass
    assert stop_loader_workers() >= 1
    assert loader._iterator is None and not any(w.is_alive() for w in workers)
    assert [b.tolist() for b in loader] == first == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert stop_loader_workers() >= 1
