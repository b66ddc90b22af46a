"""Stage 7 misused: a rerun after the model or an option changed, test ids the shards lack, a damaged shard, a
folder as --output, a sub-cent median; and stage 5 told of samples stage 4 never wrote."""
from __future__ import annotations

import csv
import json
import logging
import shutil

from conftest import read_csv_rows, run_script, run_stage5, write_csv_rows

BASE = ["--model", "tiny", "--batch-size", "2", "--workers", "1", "--flush-every", "1"]


def read_prices(path) -> dict[str, str]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["sample_id", "price"]
    return dict(rows[1:])


def infer_stats(work_dir) -> dict:
    return json.loads((work_dir / "infer_test" / "stats.json").read_text())


def private_data(shard_work, tmp_path):
    """test.csv in a folder of the test's own: shard_work's data folder is shared by the session."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shard_work.data_dir / "test.csv", data / "test.csv")
    return data


def save_random_adapter(model_path: str, folder, seed: int) -> None:
    """A LoRA adapter of the tiny model with random (not zero) B: it moves the logits, as a trained one does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(folder)  # stage 7 reads the tokenizer beside the adapter


def test_a_rerun_with_a_retrained_adapter_predicts_afresh(shard_work, tmp_path):
    """The bug: parts were keyed by split alone, so after 6_train.py --overwrite a rerun wrote the old model's
    prices. Now the adapter's files are part of the parts' fingerprint: the rerun writes what a clean run of the new
    adapter writes."""
    w, fresh = shard_work.copy(tmp_path / "work"), shard_work.copy(tmp_path / "fresh")
    adapter = tmp_path / "adapter"
    args = ["--data-dir", str(w.data_dir), "--adapter", str(adapter), *BASE]
    save_random_adapter(w.model_path, adapter, seed=1)
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    first = (w.work_dir / "test_out.csv").read_bytes()
    shutil.rmtree(adapter)
    save_random_adapter(w.model_path, adapter, seed=2)  # "retrained" into the same folder
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    warning = [line for line in r.stderr.splitlines() if "not resuming from" in line]
    assert len(warning) == 1 and "WARNING" in warning[0] and "adapter_files" in warning[0], r.stderr[-3000:]
    stats = infer_stats(w.work_dir)
    assert stats["rank0_run"]["skipped_done"] == 0 and "adapter_files" in stats["restarted_because"]
    r = run_script("7_infer.py", "--work-dir", str(fresh.work_dir), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    second = (w.work_dir / "test_out.csv").read_bytes()
    assert second == (fresh.work_dir / "test_out.csv").read_bytes()
    assert second != first  # the two adapters do predict differently: the check above could have failed


def test_parts_of_another_run_are_dropped_and_the_same_run_resumes(tmp_path, caplog):
    """Any option in the fingerprint (here the planned batch size) starts the rank afresh, with one WARNING naming
    the change; the same fingerprint keeps the parts; under torchrun a rank clears only its own parts."""
    from common.model.inference import claim_parts, prediction_fingerprint, read_parts
    parts = tmp_path / "parts"
    parts.mkdir()
    legacy = parts / "part-r000-0000000-1.csv"
    legacy.write_text("sample_id,price,status\na,1.0,ok\n")

    def fingerprint(batch):
        return prediction_fingerprint("tiny", None, "text", {"batch_size": batch, "world_size": 1},
                                      {"shards": [{"name": "s0.tar", "sample_ids": ["a"]}]})

    with caplog.at_level(logging.WARNING, logger="infer"):
        assert "no fingerprint" in claim_parts(parts, 0, 1, fingerprint(2))  # parts written before the check
    assert not legacy.exists() and (parts / "run-r000.json").exists()
    legacy.write_text("sample_id,price,status\na,1.0,ok\n")
    assert claim_parts(parts, 0, 1, fingerprint(2)) is None and read_parts(parts) == {"a": (1.0, "ok")}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="infer"):
        changed = claim_parts(parts, 0, 1, fingerprint(4))
    assert changed == "batch_size 2 -> 4" and read_parts(parts) == {}
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "batch_size 2 -> 4" in caplog.text
    # two ranks: rank 1's change leaves rank 0's parts alone
    for rank in (0, 1):
        claim_parts(parts, rank, 2, fingerprint(2))
        (parts / f"part-r{rank:03d}-0000000-1.csv").write_text(f"sample_id,price,status\nr{rank},2.0,ok\n")
    assert claim_parts(parts, 1, 2, fingerprint(8)) == "batch_size 2 -> 8"
    assert read_parts(parts) == {"r0": (2.0, "ok")}


def test_missing_ids_and_a_truncated_shard_end_in_one_loud_line(shard_work, tmp_path):
    """Test ids the shards lack and a shard cut in half used to get the median with exit 0 and no word at the end.
    Now: every id is still written, a sub-cent median is written as a positive price (not 0.0000), and the
    stage ends with a WARNING counting the rows by reason, naming the shard and the stats file."""
    w, data = shard_work.copy(tmp_path / "work"), private_data(shard_work, tmp_path)
    rows = read_csv_rows(data / "test.csv")
    added = [dict(rows[0], sample_id=f"added_after_stage5_{k}") for k in range(2)]
    write_csv_rows(data / "test.csv", rows + added)
    index = json.loads((w.work_dir / "webdataset_test" / "index.json").read_text())
    cut = index["shards"][1]
    tar = w.work_dir / "webdataset_test" / cut["name"]
    tar.write_bytes(tar.read_bytes()[:cut["bytes"] // 2])
    median_file = w.work_dir / "jsonl" / "stats.json"
    median_file.write_text(json.dumps({**json.loads(median_file.read_text()), "train_median_price": 1.5e-05}))
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(data), "--adapter", "none", *BASE)
    assert r.returncode == 0, r.stderr[-3000:]
    out = read_prices(w.work_dir / "test_out.csv")
    assert list(out) == [row["sample_id"] for row in rows + added]
    assert all(float(p) > 0 for p in out.values())
    assert out["added_after_stage5_0"] == "1.5e-05"
    stats = infer_stats(w.work_dir)
    assert stats["fallback_ids"]["not_in_shards"] == [a["sample_id"] for a in added]
    unread = stats["fallback_ids"]["no_sample"]
    # the samples before the cut are still read and predicted
    assert unread and set(unread) < set(cut["sample_ids"]) and cut["sample_ids"][-1] in unread
    last = r.stderr.strip().splitlines()[-1]
    total = len(rows) + len(added)
    assert "WARNING" in last and f"{len(unread) + 2} of {total} test ids had no prediction" in last, last
    assert f"no_sample {len(unread)}" in last and "not_in_shards 2" in last and cut["name"] in last
    assert "added_after_stage5_0" in last and "1.5e-05" in last
    assert str(w.work_dir / "infer_test" / "stats.json") in last
    assert stats["fallback_warning"] == last.split("WARNING ", 1)[1]


def test_a_test_csv_none_of_whose_ids_are_in_the_shards_is_an_error_after_the_file(shard_work, tmp_path):
    w, data = shard_work.copy(tmp_path / "work"), private_data(shard_work, tmp_path)
    rows = read_csv_rows(data / "test.csv")
    write_csv_rows(data / "test.csv", [dict(row, sample_id=f"other_{k}") for k, row in enumerate(rows[:3])])
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(data), "--adapter", "none", *BASE)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("7_infer.py: error: none of the 3 test ids") and "not_in_shards 3" in last, last
    assert list(read_prices(w.work_dir / "test_out.csv")) == ["other_0", "other_1", "other_2"]  # written anyway


def test_output_that_is_a_folder_or_under_a_file_is_refused_up_front(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    for output, expected in ((tmp_path / "a_folder", "is a folder"), (tmp_path / "a_file" / "out.csv", "is a file")):
        r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(w.data_dir), "--adapter",
                       "none", *BASE, "--output", str(output))
        assert r.returncode == 2 and f"--output {output}" in r.stderr and expected in r.stderr, r.stderr[-2000:]
        assert not (w.work_dir / "infer_test").exists()  # refused before any inference


def test_prices_are_never_written_as_zero(tmp_path):
    from common.model.inference import write_predictions_csv
    rows = [("a", 12.345678, "ok"), ("b", 0.01, "ok"), ("c", 4.2e-05, "ok"), ("d", 5e-324, "ok")]
    write_predictions_csv(tmp_path / "out.csv", rows)
    out = read_prices(tmp_path / "out.csv")
    assert out["a"] == "12.3457" and out["b"] == "0.0100"  # normal prices keep their 4 decimals
    assert all(float(p) > 0 for p in out.values()) and float(out["c"]) == 4.2e-05


def test_stage5_warns_of_samples_stage4_did_not_write(encoded_demo, tmp_path, capfd):
    w = encoded_demo.copy(tmp_path / "work")
    gone = [row["sample_id"] for row in w.rows("test")[:2]]
    for sid in gone:
        shutil.rmtree(w.pre_dir("test") / sid)
    run_stage5(w.work_dir, samples_per_shard=5, split="test")  # stage logs replace pytest's handler: read stderr
    warnings = [line.split("WARNING ", 1)[1] for line in capfd.readouterr().err.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "2 of 20 rows" in warnings[0] and all(sid in warnings[0] for sid in gone), warnings
    stats = json.loads((w.shards_dir("test") / "stats.json").read_text())
    assert stats["missing_ids"] == gone and stats["missing_warning"] == warnings[0]
