"""Stage 6 on the tiny model: the loss falls, kill + resume ends at the same step, two ranks see
disjoint data, a NaN loss stops the run before anything is saved."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script

FAST = ["--batch-size", "4", "--grad-accum", "1", "--workers", "1", "--eval-samples", "8",
        "--eval-batch-size", "8", "--logging-steps", "1", "--lora-r", "16", "--lora-alpha", "16"]


def losses(output_dir: Path) -> list[float]:
    stats = json.loads((output_dir / "stats.json").read_text())
    return [h["loss"] for h in stats["log_history"] if "loss" in h]


def test_training_loss_falls_and_output_is_self_describing(shard_work, tmp_path):
    out = tmp_path / "train"
    r = run_script("6_train.py", "--work-dir", str(shard_work.work_dir), "--output-dir", str(out), "--max-steps",
                   "40", "--learning-rate", "3e-3", "--eval-steps", "20", "--save-steps", "20", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = losses(out)
    assert len(seen) == 40 and all(math.isfinite(x) for x in seen)
    assert sum(seen[-10:]) / 10 < 0.7 * sum(seen[:5]) / 5, seen
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "preprocessor_config.json",
                 "prompt.json", "train_config.json", "stats.json", "COMPLETE"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["base_model"] == shard_work.model_path and cfg["encoding"]["max_pixels"] == 25088
    stats = json.loads((out / "stats.json").read_text())
    evals = [h for h in stats["log_history"] if "eval_smape" in h]
    assert len(evals) >= 2 and all(0 <= e["eval_smape"] <= 200 for e in evals)  # logged beside the loss
    slowest = stats["timing"]["slowest_steps"]  # which steps pulled the steady rate down, slowest first
    assert 1 <= len(slowest) <= 3 and all(3 < step <= 40 for step, _ in slowest), slowest
    assert [s for _, s in slowest] == sorted((s for _, s in slowest), reverse=True), slowest
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard
    # a rerun of a finished stage is skipped, not retrained
    again = run_script("6_train.py", "--work-dir", str(shard_work.work_dir), "--output-dir", str(out), *FAST)
    assert again.returncode == 0 and "holds a finished run" in again.stderr


def test_kill_then_resume_ends_at_the_same_step(shard_work, tmp_path):
    out = tmp_path / "train"
    args = [sys.executable, str(ROOT / "6_train.py"), "--work-dir", str(shard_work.work_dir), "--output-dir",
            str(out), "--max-steps", "30", "--save-steps", "5", "--save-total-limit", "2", "--eval-steps", "0", *FAST]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint-10" / "COMPLETE").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "COMPLETE").exists()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == 30 and stats["resumed_from"] and "checkpoint-" in stats["resumed_from"]
    assert math.isfinite(stats["train_loss"])
    resumed_at = int(stats["resumed_from"].rsplit("-", 1)[1])
    assert resumed_at >= 10
    # the history restored from the checkpoint continues without a gap or a repeated step
    assert [h["step"] for h in stats["log_history"] if "loss" in h] == list(range(1, 31))
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(kept) <= 2 and all((out / k / "COMPLETE").exists() for k in kept)


def test_torchrun_two_ranks_see_disjoint_samples(shard_work, tmp_path):
    out, seen = tmp_path / "train", tmp_path / "seen"
    r = run_script("6_train.py", "--work-dir", str(shard_work.work_dir), "--output-dir", str(out), "--max-steps",
                   "3", "--eval-steps", "0", "--save-steps", "100", "--record-samples", str(seen),
                   "--prefetch-factor", "1", "--group-window", "1", *FAST, torchrun=2)  # read ahead one batch only
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    per_rank = {}
    for f in seen.glob("rank*-worker*.txt"):
        per_rank.setdefault(f.name.split("-")[0], []).extend(line.split("\t")[0] for line in f.read_text().splitlines())
    assert set(per_rank) == {"rank0", "rank1"}
    a, b = set(per_rank["rank0"]), set(per_rank["rank1"])
    assert a and b and not (a & b)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == 3 and stats["world_size"] == 2
    assert stats["ranks_hold_same_weights"] is True  # gradients in DDP's buckets still all-reduced every step


def test_nan_loss_stops_before_saving(shard_work, tmp_path):
    out = tmp_path / "train"
    r = run_script("6_train.py", "--work-dir", str(shard_work.work_dir), "--output-dir", str(out), "--max-steps",
                   "20", "--learning-rate", "1e30", "--lr-scheduler", "constant", "--warmup-ratio", "0",
                   "--eval-steps", "0", "--save-steps", "100", *FAST)
    assert r.returncode != 0
    assert "NaN or infinite" in r.stderr
    assert not (out / "adapter_model.safetensors").exists() and not (out / "COMPLETE").exists()


def test_bad_options_are_all_reported_at_once(tmp_path):
    r = run_script("6_train.py", "--work-dir", str(tmp_path), "--batch-size", "-1", "--learning-rate", "-1",
                   "--speedups-off", "compile,warp_drive", "--global-batch-size", "12", "--grad-accum", "5")
    assert r.returncode == 2
    for text in ("--batch-size must be >= 0", "--learning-rate must be > 0", "--speedups-off: unknown warp_drive",
                 "run the earlier stages first"):
        assert text in r.stderr


def _weights_check_rank(rank: int, store_dir: str, differ: bool, out_dir: str) -> None:
    import torch.distributed as dist

    from common.model.training import ranks_hold_same_weights
    dist.init_process_group("gloo", store=dist.FileStore(f"{store_dir}/store", 2), rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        model[0].weight.requires_grad_(False)  # frozen weights may differ; only trainable ones are compared
        with torch.no_grad():
            model[0].weight.add_(rank)
            if differ and rank == 1:
                model[1].bias.add_(1e-6)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(ranks_hold_same_weights(model)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True])
def test_ranks_holding_different_trainable_weights_are_caught(tmp_path, differ):
    import torch.multiprocessing as mp
    mp.spawn(_weights_check_rank, args=(str(tmp_path), differ, str(tmp_path)), nprocs=2)
    verdicts = {json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert verdicts == {not differ}
    from common.model.training import ranks_hold_same_weights
    assert ranks_hold_same_weights(torch.nn.Linear(2, 2)) is None  # outside torchrun


def test_steady_rate_leaves_out_the_steps_that_compiled():
    """A step during which torch.compile compiles (real dynamo, the eager backend) is listed apart and left out of
    the steady rate; the steps around it count."""
    from transformers import TrainerState

    from common.model.training import StepTimer
    timer, state = StepTimer(warmup=3), TrainerState(max_steps=10)
    timer.on_train_begin(None, state, None)
    compiled = torch.compile(lambda x: x.sin() + 1, backend="eager", dynamic=True)
    for step in range(1, 11):
        state.global_step = step
        if step == 6:
            compiled(torch.randn(3))
        timer.on_step_end(None, state, None)
    timing = timer.summary(samples_per_step=16)
    assert [step for step, _ in timing["compile_steps"]] == [6], timing
    assert timing["steady_steps"] == 10 - 3 - 1 and timing["steady_samples_per_s"] > 0, timing
