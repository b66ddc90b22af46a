"""Stage 6 misused: --overwrite / --no-resume aimed at a folder it did not write, a bad --model after --overwrite, a
checkpoint marked COMPLETE whose adapter was cut short, a negative --eval-steps; and stage 7 given another base than
the adapter's, a folder that is no adapter, or run from another directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script

FAST = ["--batch-size", "4", "--grad-accum", "1", "--workers", "1", "--eval-samples", "8", "--eval-batch-size", "8",
        "--logging-steps", "1"]
TWO_STEPS = ["--max-steps", "2", "--save-steps", "1", "--eval-steps", "0", *FAST]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def trained(shard_work, tmp_path_factory):
    """shard_work trained 2 steps (a checkpoint each), --model tiny and a --work-dir relative to the directory the
    script runs in, as `--work-dir work` is. Copy it before changing it."""
    w = shard_work.copy(tmp_path_factory.mktemp("trained") / "work")
    r = run_script("6_train.py", "--work-dir", os.path.relpath(w.work_dir, ROOT), *TWO_STEPS)
    assert r.returncode == 0, r.stderr[-3000:]
    return w


def test_stage_6_trains_the_model_stage_4_encoded_with_and_refuses_another(shard_work, tmp_path):
    """Without --model, stage 6 follows 4_preprocess.py's model (train_config.json names it); a copy of that model
    folder is the same model; a model with other image settings is refused in one line, before anything runs."""
    w = shard_work.copy(tmp_path / "work").work_dir
    encoded = json.loads((w / "preprocessed" / "train" / "stats.json").read_text())["options"]["model"]
    assert encoded == "tiny"  # as stage 4 was given it: this work folder's tiny model
    folder = (w / "models" / "tiny").resolve()
    other = tmp_path / "other-model"
    shutil.copytree(folder, other)
    settings = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps({**settings, "max_pixels": settings["max_pixels"] * 2}))
    r = run_script("6_train.py", "--work-dir", str(w), "--model", str(other), *TWO_STEPS)
    assert r.returncode == 1 and error_lines(r.stderr) == [
        f"6_train.py: error: --model {other} is not the model 4_preprocess.py encoded {w / 'preprocessed' / 'train'} "
        f"with ({encoded}): leave --model out to train that one, or rerun 4_preprocess.py and 5_convert.py with "
        f"--model {other} --force"], r.stderr[-3000:]
    assert not (w / "train").exists()
    same = tmp_path / "same-model"
    shutil.copytree(folder, same)
    for model in ([], ["--model", str(same)]):
        r = run_script("6_train.py", "--work-dir", str(w), "--overwrite", *model, *TWO_STEPS)
        assert r.returncode == 0, r.stderr[-3000:]
        base = json.loads((w / "train" / "train_config.json").read_text())["base_model"]
        assert base == str(same if model else folder)


@pytest.mark.parametrize("flag", ["--overwrite", "--no-resume"])
def test_clearing_a_folder_stage_6_did_not_write_is_refused_before_anything_is_deleted(shard_work, tmp_path, flag):
    w = shard_work.copy(tmp_path / "work").work_dir
    before = listing(w)
    r = run_script("6_train.py", "--work-dir", str(w), "--output-dir", str(w), flag, "--max-steps", "2",
                   "--model", str(w / "models" / "nope"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"--output-dir {w} holds files stage 6 did not write (e.g. images, jsonl, models)" in r.stderr
    assert listing(w) == before


def test_a_bad_model_with_overwrite_keeps_the_finished_run_and_a_good_one_replaces_it(trained, tmp_path):
    w = trained.copy(tmp_path / "work").work_dir
    before = listing(w)
    r = run_script("6_train.py", "--work-dir", str(w), "--model", str(w / "jsonl"), "--overwrite", *TWO_STEPS)
    assert r.returncode == 1 and error_lines(r.stderr) == [f"6_train.py: error: model folder {w / 'jsonl'} not "
                                                           "found (or has no config.json)"], r.stderr[-3000:]
    assert listing(w) == before  # the finished run in work/train among them
    r = run_script("6_train.py", "--work-dir", str(w), "--overwrite", "--max-steps", "1", "--save-steps", "100",
                   "--eval-steps", "0", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((w / "train" / "stats.json").read_text())["steps"] == 1
    # the old run was cleared, not trained over: its checkpoint-2 is gone (the Trainer saves the last step itself)
    assert sorted(p.name for p in (w / "train").glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_truncated_checkpoint_is_passed_over_for_the_one_before(trained, tmp_path):
    from common.model.checkpoints import COMPLETE, latest_complete_checkpoint
    out = trained.copy(tmp_path / "work").work_dir / "train"
    (out / COMPLETE).unlink()  # an unfinished run, killed after its second checkpoint
    adapter = out / "checkpoint-2" / "adapter_model.safetensors"
    whole = adapter.read_bytes()
    adapter.write_bytes(whole[: len(whole) // 2])
    r = run_script("6_train.py", "--work-dir", str(out.parent), *TWO_STEPS)
    assert r.returncode == 0, r.stderr[-3000:]
    warning = [line for line in r.stderr.splitlines() if str(adapter) in line]
    assert len(warning) == 1 and "WARNING" in warning[0] and "resuming from checkpoint-1 instead" in warning[0]
    assert json.loads((out / "stats.json").read_text())["resumed_from"].endswith("checkpoint-1")
    assert latest_complete_checkpoint(out) == out / "checkpoint-2"  # saved whole again on the way
    # a marker written before sizes were recorded: the safetensors header still gives the cut away
    marker = json.loads((out / "checkpoint-2" / COMPLETE).read_text())
    (out / "checkpoint-2" / COMPLETE).write_text(json.dumps({"step": 2, "files": marker["files"]}))
    adapter.write_bytes(adapter.read_bytes()[:-1])
    assert latest_complete_checkpoint(out) == out / "checkpoint-1"


def test_negative_eval_steps_is_an_option_problem(trained):
    r = run_script("6_train.py", "--work-dir", str(trained.work_dir), "--eval-steps", "-5")
    assert r.returncode == 2 and "--eval-steps must be >= 0" in r.stderr, r.stderr[-3000:]
    # 0 (evaluate at the end only) stays valid: `trained` was made with it


def other_size_model(tiny: Path, folder: Path) -> Path:
    """The tiny model with a wider MLP: same tokenizer and image settings, LoRA shapes that do not fit."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = Qwen2_5_VLConfig.from_pretrained(tiny)
    config.text_config.intermediate_size *= 2
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_stage_7_with_another_base_names_the_adapters_base(trained, tmp_path):
    tiny = (trained.work_dir / "models" / "tiny").resolve()
    other = other_size_model(tiny, tmp_path / "other")
    r = run_script("7_infer.py", "--work-dir", str(trained.work_dir), "--data-dir", str(trained.data_dir),
                   "--model", str(other), "--batch-size", "2", "--workers", "1")
    assert r.returncode == 1, r.stderr[-3000:]
    assert error_lines(r.stderr) == [f"7_infer.py: error: adapter {trained.work_dir / 'train'} was trained on base "
                                     f"{tiny} (from its train_config.json), not {other}: pass --model {tiny}"]
    assert "size mismatch" not in r.stderr and "Traceback" not in r.stderr


def test_a_folder_that_is_no_adapter_is_named(trained):
    from common.errors import PipelineError
    from common.model.loading import load_for_inference
    jsonl = trained.work_dir / "jsonl"
    with pytest.raises(PipelineError, match=f"--adapter {jsonl} is not a LoRA adapter \\(no adapter_config.json"):
        load_for_inference(str(trained.work_dir / "models" / "tiny"), str(jsonl), "hf")
    r = subprocess.run([sys.executable, str(ROOT / "7_infer.py"), "--work-dir", str(trained.work_dir), "--data-dir",
                        str(trained.data_dir), "--adapter", str(jsonl)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"--adapter {jsonl} is not a LoRA adapter (no adapter_config.json there)" in r.stderr


def test_stage_7_runs_from_another_directory(trained, tmp_path):
    cfg = json.loads((trained.work_dir / "train" / "train_config.json").read_text())
    assert cfg["base_model"] == str((trained.work_dir / "models" / "tiny").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "test_out.csv"
    r = subprocess.run([sys.executable, str(ROOT / "7_infer.py"), "--work-dir", str(trained.work_dir), "--data-dir",
                        str(trained.data_dir), "--output", str(out), "--run-dir", str(tmp_path / "run"),
                        "--batch-size", "4", "--workers", "1"], cwd=elsewhere, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 21  # header + the 20 test rows
