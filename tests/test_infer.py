"""Stage 7: every test id answered exactly once with a positive price, whatever went missing on the way;
kill + rerun gives the same file; two ranks give the same file as one."""
from __future__ import annotations

import csv
import json
import math

import pytest

from conftest import kill_script_when, run_script

BASE = ["--adapter", "none", "--model", "tiny", "--batch-size", "2", "--workers", "1", "--flush-every", "1"]


def read_out(path) -> list[tuple[str, float]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["sample_id", "price"]
    return [(r[0], float(r[1])) for r in rows[1:]]


def test_test_out_has_every_id_even_with_a_missing_shard(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    test_ids = [r["sample_id"] for r in csv.DictReader(open(w.data_dir / "test.csv", newline=""))]
    shards = sorted((w.work_dir / "webdataset_test").glob("test-shard-*.tar"))
    assert len(shards) >= 2
    lost = json.loads((w.work_dir / "webdataset_test" / "index.json").read_text())["shards"][1]["sample_ids"]
    shards[1].unlink()
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(w.data_dir), *BASE)
    assert r.returncode == 0, r.stderr[-3000:]
    out = read_out(w.work_dir / "test_out.csv")
    assert [sid for sid, _ in out] == test_ids  # every id once, in test.csv's order
    assert all(math.isfinite(p) and p > 0 for _, p in out)
    stats = json.loads((w.work_dir / "infer_test" / "stats.json").read_text())
    assert sorted(stats["fallback_ids"]["no_sample"]) == sorted(lost)
    median = json.loads((w.work_dir / "jsonl" / "stats.json").read_text())["train_median_price"]
    assert all(p == pytest.approx(median, abs=1e-4) for sid, p in out if sid in lost)
    # the demo has a test row whose image failed: it was answered from its text
    text_only = [json.loads(l)["sample_id"] for l in open(w.work_dir / "jsonl" / "test.jsonl")
                 if len(json.loads(l)["messages"][1]["content"]) == 1]
    assert text_only and all(sid in dict(out) for sid in text_only)


def test_unparsable_outputs_fall_back_to_the_median(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    # an untrained model, decoding unconstrained: its text is not a number
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(w.data_dir), *BASE,
                   "--no-constrained")
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((w.work_dir / "infer_test" / "stats.json").read_text())
    assert stats["fallback_counts"].get("unparsable", 0) > 0
    out = read_out(w.work_dir / "test_out.csv")
    assert len(out) == stats["rows_expected"] and all(math.isfinite(p) and p > 0 for _, p in out)


def test_kill_and_rerun_gives_an_identical_file(shard_work, tmp_path):
    clean, killed = shard_work.copy(tmp_path / "clean"), shard_work.copy(tmp_path / "killed")
    r = run_script("7_infer.py", "--work-dir", str(clean.work_dir), "--data-dir", str(clean.data_dir), *BASE)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = killed.work_dir / "infer_test" / "parts"
    kill_script_when("7_infer.py", "--work-dir", str(killed.work_dir), "--data-dir", str(killed.data_dir), *BASE,
                     ready=lambda: len(list(parts.glob("part-*.csv"))) >= 2)
    assert not (killed.work_dir / "test_out.csv").exists()
    r = run_script("7_infer.py", "--work-dir", str(killed.work_dir), "--data-dir", str(killed.data_dir), *BASE)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((killed.work_dir / "infer_test" / "stats.json").read_text())
    assert stats["rank0_run"]["skipped_done"] > 0  # it resumed rather than starting over
    assert (killed.work_dir / "test_out.csv").read_bytes() == (clean.work_dir / "test_out.csv").read_bytes()


def test_two_ranks_equal_one_rank(shard_work, tmp_path):
    one, two = shard_work.copy(tmp_path / "one"), shard_work.copy(tmp_path / "two")
    r1 = run_script("7_infer.py", "--work-dir", str(one.work_dir), "--data-dir", str(one.data_dir), *BASE,
                    "--no-sort-by-length", "--batch-size", "1")
    r2 = run_script("7_infer.py", "--work-dir", str(two.work_dir), "--data-dir", str(two.data_dir), *BASE,
                    "--no-sort-by-length", "--batch-size", "1", torchrun=2)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr + r2.stderr)[-4000:]
    parts = list((two.work_dir / "infer_test" / "parts").glob("part-r001-*.csv"))
    assert parts  # rank 1 really predicted its share
    assert (one.work_dir / "test_out.csv").read_bytes() == (two.work_dir / "test_out.csv").read_bytes()


def test_validation_report(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(w.data_dir), *BASE,
                   "--split", "validation")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = w.work_dir / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    n_val = sum(1 for _ in open(w.work_dir / "jsonl" / "validation.jsonl"))
    assert metrics["rows"] == n_val and 0 <= metrics["smape"] <= 200 and metrics["median_baseline_smape"] > 0
    assert len(metrics["by_decile"]) == 10
    report = (ev / "report.md").read_text()
    assert "pred_vs_true.png" in report and "error_hist.png" in report
    for png in ("pred_vs_true.png", "error_hist.png"):
        assert (ev / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_static_cache_decoding_predicts_what_generate_predicts(shard_work, tmp_path):
    """Stage 7's prediction loop with the static-cache decoder (the GPU default, there each step a CUDA-graph
    replay; eager here) writes the prices the library's generate() writes, batch for batch."""
    from common.data.encode import ImageSpec, load_tokenizer
    from common.data.shards import ShardStream
    from common.model.collate import for_tokenizer
    from common.model.inference import read_parts, run_predictions, text_predictor
    from common.model.loading import load_for_inference
    from common.speed.decode import StaticDecoder
    from common.speed.positions import HostLayout
    tok = load_tokenizer(shard_work.model_path)
    spec = ImageSpec.from_model(shard_work.model_path)
    got = {}
    for decode in ("generate", "static"):
        model, _ = load_for_inference(shard_work.model_path, None, "hf")
        collator = for_tokenizer(tok, "left", with_labels=False, host_ids=HostLayout.from_model(model))
        stream = ShardStream(shard_work.work_dir / "webdataset_test", spec, normalize=False)
        predict = text_predictor(model, tok, True, spec, StaticDecoder(model, graphs=False) if decode == "static"
                                 else None)
        run = run_predictions(predict, stream, collator, tmp_path / decode, 0, 3, 0, True, 4, 1)
        assert run["computed"] > 10
        got[decode] = read_parts(tmp_path / decode)
    assert got["static"] == got["generate"]


def test_options_are_checked_up_front(shard_work, tmp_path):
    w = shard_work.copy(tmp_path / "work")
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(w.data_dir), *BASE,
                   "--backend", "unsloth", "--batch-size", "-1", "--speedups-off", "warp_drive")
    assert r.returncode == 2
    import torch
    for expected in ("--batch-size and --max-gpu-memory must be >= 0", "--speedups-off: unknown warp_drive",
                     *([] if torch.cuda.is_available() else ["--backend unsloth needs"])):
        assert expected in r.stderr, r.stderr[-2000:]
    assert not (w.work_dir / "infer_test").exists()


def test_batches_prepared_ahead_keep_their_order_and_hand_errors_to_the_caller():
    """Stage 7 prepares batches in a thread running ahead of the GPU: the caller gets every batch in order
    (done ones unprepared), an error raised while preparing reaches the caller after the batches before it,
    and a caller that stops early stops the thread."""
    import threading

    from common.model.inference import _prepared_ahead

    def batches(n, fail_at=None):
        for k in range(n):
            if k == fail_at:
                raise OSError(f"shard {k} unreadable")
            yield [k], k % 3 != 0  # every third batch already done

    got = list(_prepared_ahead(batches(10), lambda b: ("prepared", b[0]), depth=2))
    assert got == [([k], None if k % 3 == 0 else ("prepared", k)) for k in range(10)]

    seen = []
    with pytest.raises(OSError, match="shard 5 unreadable"):
        for batch, _ in _prepared_ahead(batches(10, fail_at=5), lambda b: b):
            seen.append(batch[0])
    assert seen == [0, 1, 2, 3, 4]

    stream = _prepared_ahead(batches(1000), lambda b: b, depth=2)
    assert next(stream)[0] == [0]
    stream.close()  # the caller stops after one batch
    assert not any(t.name == "prepare-batches" and t.is_alive() for t in threading.enumerate())
