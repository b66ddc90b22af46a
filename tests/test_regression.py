"""The regression objective: a price head on log price beside the text objective, its embeddings for stacking."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from conftest import CPU_PLAN, ShardWork, kill_script_when, load_stage, run_script

INFER = ["--workers", "1", "--flush-every", "1", "--batch-size", "2"]


@pytest.fixture(scope="session")
def regression_work(shard_work, tmp_path_factory) -> ShardWork:
    """shard_work with a regression adapter and head trained for 40 steps in WORK/train."""
    work = shard_work.copy(tmp_path_factory.mktemp("regression") / "work")
    r = run_script("6_train.py", "--work-dir", str(work.work_dir), "--objective", "regression", "--max-steps", "40",
                   "--global-batch-size", "8", "--workers", "1", "--eval-steps", "20", "--eval-samples", "8",
                   "--learning-rate", "3e-3", "--head-learning-rate", "1e-2", "--save-steps", "20",
                   "--logging-steps", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def test_only_the_adapter_and_the_head_train_and_both_get_gradients(tiny_model_dir, encoded_demo):
    import itertools

    from common.data.shards import ShardStream
    from common.model.collate import for_tokenizer
    from common.data.encode import load_tokenizer
    from common.model.head import attach_head, pooled, regression_loss
    from common.model.loading import LoraSettings, load_for_training
    from common.model.predict import with_normalized_pixels
    model = load_for_training(str(tiny_model_dir), CPU_PLAN, LoraSettings(r=4, alpha=8), 0)
    head = attach_head(model, mean_log_price=2.5)
    assert head.net[2].bias.item() == pytest.approx(2.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("price_head.") for n in trainable)
    assert any(n.startswith("price_head.") for n in trainable)
    samples = list(itertools.islice(iter(ShardStream(encoded_demo.shards_dir("train"), encoded_demo.spec(),
                                                     normalize=False)), 6))
    batch = with_normalized_pixels(for_tokenizer(load_tokenizer(str(tiny_model_dir)), pooled=True)(samples),
                                   encoded_demo.spec())
    assert "labels" not in batch
    torch.testing.assert_close(batch["price_targets"], torch.tensor([s["price"] for s in samples]))
    assert torch.equal(batch["last_positions"], torch.tensor([s["answer_start"] - 1 for s in samples]))
    last, prices = batch.pop("last_positions"), batch.pop("price_targets")
    out = model(**batch, output_hidden_states=True, logits_to_keep=1)
    regression_loss(head(pooled(out.hidden_states[-1], last)), prices).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at zero: A has none yet
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_the_adapter_and_the_head_fit_a_fixed_batch(tiny_model_dir, encoded_demo):
    """Learning, shown where it is not a coin toss: 40 steps on 8 samples halve the loss (a 40-step run over the
    demo's shuffled batches moves its loss by less than batch-to-batch noise on a random tiny model)."""
    import itertools

    from common.data.encode import load_tokenizer
    from common.data.shards import ShardStream
    from common.model.collate import for_tokenizer
    from common.model.head import attach_head, mean_log_price, pooled, regression_loss
    from common.model.loading import LoraSettings, load_for_training
    from common.model.predict import with_normalized_pixels
    torch.manual_seed(0)
    model = load_for_training(str(tiny_model_dir), CPU_PLAN, LoraSettings(r=8, alpha=8), 0)
    samples = list(itertools.islice(iter(ShardStream(encoded_demo.shards_dir("train"), encoded_demo.spec(),
                                                     normalize=False)), 8))
    head = attach_head(model, mean_log_price=mean_log_price([s["price"] for s in samples]))
    batch = with_normalized_pixels(for_tokenizer(load_tokenizer(str(tiny_model_dir)), pooled=True)(samples),
                                   encoded_demo.spec())
    last, prices = batch.pop("last_positions"), batch.pop("price_targets")
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("price_head.")]
    optimizer = torch.optim.AdamW([{"params": adapter, "lr": 3e-3}, {"params": head.parameters(), "lr": 1e-2}])
    losses = []
    for _ in range(40):
        out = model(**batch, output_hidden_states=True, logits_to_keep=1)
        loss = regression_loss(head(pooled(out.hidden_states[-1], last)), prices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_training_saves_the_head_with_the_adapter_and_in_each_checkpoint(regression_work):
    out = regression_work.work_dir / "train"
    config = json.loads((out / "train_config.json").read_text())
    assert config["objective"] == "regression"
    stats = json.loads((out / "stats.json").read_text())
    evals = [h["eval_smape"] for h in stats["log_history"] if "eval_smape" in h]
    assert len(evals) >= 2 and all(0 <= e <= 200 for e in evals)
    assert len([h for h in stats["log_history"] if "loss" in h]) == 40
    from safetensors.torch import load_file
    heads = [load_file(str(out / f"checkpoint-{step}" / "price_head.safetensors")) for step in (20, 40)]
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # the Trainer steps the head
    for folder in (out, out / "checkpoint-40"):
        assert (folder / "price_head.safetensors").exists() and (folder / "head_config.json").exists()
        complete = folder / "COMPLETE"
        assert complete.exists()
    assert "price_head.safetensors" in json.loads((out / "checkpoint-40" / "COMPLETE").read_text())["files"]


def test_every_test_id_gets_one_positive_price_and_a_reload_predicts_the_same(regression_work, tmp_path):
    w = regression_work.copy(tmp_path / "work")
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(w.data_dir), *INFER)
    assert r.returncode == 0, r.stderr[-3000:]
    test_ids = [row["sample_id"] for row in csv.DictReader(open(w.data_dir / "test.csv", newline=""))]
    rows = list(csv.DictReader(open(w.work_dir / "test_out.csv", newline="")))
    assert [row["sample_id"] for row in rows] == test_ids
    prices = [float(row["price"]) for row in rows]
    floor = json.loads((w.work_dir / "train" / "head_config.json").read_text())["price_floor"]
    assert all(math.isfinite(p) and p >= floor > 0 for p in prices) and len(set(prices)) > 1
    stats = json.loads((w.work_dir / "infer_test" / "stats.json").read_text())
    assert stats["objective"] == "regression" and stats["plan"]["decode"] == "one forward"
    # the saved head and adapter, loaded anew in this process, predict the prices stage 7 wrote
    from common.data.encode import ImageSpec, load_tokenizer
    from common.data.shards import ShardStream
    from common.model.collate import for_tokenizer
    from common.model.head import load_head
    from common.model.inference import regression_predictor
    from common.model.loading import load_for_inference
    from common.speed.positions import HostLayout
    model, _ = load_for_inference(w.model_path, str(w.work_dir / "train"), "hf")
    head, floor = load_head(w.work_dir / "train", "cpu")
    spec = ImageSpec.from_model(w.model_path)
    samples = [s for s in ShardStream(w.work_dir / "webdataset_test", spec, normalize=False)][:2]
    from common.speed.positions import skip_image_readbacks
    skip_image_readbacks(model)
    batch = for_tokenizer(load_tokenizer(w.model_path), pooled=True, host_ids=HostLayout.from_model(model))(samples)
    ours = regression_predictor(model, head, floor, spec)(batch)
    written = dict(zip(test_ids, prices))
    for s, p in zip(samples, ours):
        assert p == pytest.approx(written[s["sample_id"]], rel=1e-4)


def test_kill_and_rerun_gives_an_identical_file(regression_work, tmp_path):
    clean, killed = regression_work.copy(tmp_path / "clean"), regression_work.copy(tmp_path / "killed")
    r = run_script("7_infer.py", "--work-dir", str(clean.work_dir), "--data-dir", str(clean.data_dir), *INFER)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = killed.work_dir / "infer_test" / "parts"
    kill_script_when("7_infer.py", "--work-dir", str(killed.work_dir), "--data-dir", str(killed.data_dir), *INFER,
                     ready=lambda: len(list(parts.glob("part-*.csv"))) >= 2)
    r = run_script("7_infer.py", "--work-dir", str(killed.work_dir), "--data-dir", str(killed.data_dir), *INFER)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((killed.work_dir / "infer_test" / "stats.json").read_text())["rank0_run"]["skipped_done"] > 0
    assert (killed.work_dir / "test_out.csv").read_bytes() == (clean.work_dir / "test_out.csv").read_bytes()


def test_two_ranks_write_the_file_one_rank_writes(regression_work, tmp_path):
    one, two = regression_work.copy(tmp_path / "one"), regression_work.copy(tmp_path / "two")
    extra = ["--no-sort-by-length", "--batch-size", "1"]
    r1 = run_script("7_infer.py", "--work-dir", str(one.work_dir), "--data-dir", str(one.data_dir), *INFER, *extra)
    r2 = run_script("7_infer.py", "--work-dir", str(two.work_dir), "--data-dir", str(two.data_dir), *INFER, *extra,
                    torchrun=2)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr + r2.stderr)[-4000:]
    assert list((two.work_dir / "infer_test" / "parts").glob("part-r001-*.csv"))
    assert (one.work_dir / "test_out.csv").read_bytes() == (two.work_dir / "test_out.csv").read_bytes()


@pytest.mark.parametrize("split", ["test", "validation", "train"])
def test_embeddings_hold_one_row_per_id_in_the_splits_order(regression_work, tmp_path, split):
    w = regression_work.copy(tmp_path / "work")
    r = run_script("7_infer.py", "--work-dir", str(w.work_dir), "--data-dir", str(w.data_dir), "--split", split,
                   "--embeddings", *INFER)
    assert r.returncode == 0, r.stderr[-3000:]
    vectors = np.load(w.work_dir / "embeddings" / f"{split}.npy")
    ids = [row["sample_id"] for row in csv.DictReader(open(w.work_dir / "embeddings" / f"{split}_ids.csv"))]
    if split == "test":
        expected = [row["sample_id"] for row in csv.DictReader(open(w.data_dir / "test.csv", newline=""))]
    else:
        expected = [json.loads(line)["sample_id"] for line in open(w.work_dir / "jsonl" / f"{split}.jsonl")]
    assert ids == expected and vectors.shape == (len(ids), 128) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all() and len({v.tobytes() for v in vectors}) == len(ids)


def test_resuming_restores_the_head(regression_work, tmp_path):
    """A run killed after its checkpoint at step 6 and resumed ends with the head an uninterrupted run ends with."""
    args = ["--work-dir", str(regression_work.work_dir), "--objective", "regression", "--max-steps", "12",
            "--global-batch-size", "4", "--workers", "0", "--eval-steps", "0", "--eval-samples", "4",
            "--learning-rate", "3e-3", "--save-steps", "6"]
    r = run_script("6_train.py", *args, "--output-dir", str(tmp_path / "whole"))
    assert r.returncode == 0, r.stderr[-3000:]
    cut = tmp_path / "cut"
    kill_script_when("6_train.py", *args, "--output-dir", str(cut), ready=(cut / "checkpoint-6" / "COMPLETE").exists)
    assert not (cut / "COMPLETE").exists()
    r = run_script("6_train.py", *args, "--output-dir", str(cut))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((cut / "stats.json").read_text())["resumed_from"].endswith("checkpoint-6")
    from safetensors.torch import load_file
    whole, resumed = load_file(tmp_path / "whole" / "price_head.safetensors"), load_file(cut / "price_head.safetensors")
    for name, w in whole.items():
        torch.testing.assert_close(resumed[name], w, msg=name)


def test_one_forward_inference_compiles_its_decoder_layers_and_predicts_the_same(regression_work):
    """compile_one_forward (GPU-only like compile): the price head's forward keeps no KV cache, so its decoder
    layers compile as training's do; generation keeps them eager, and so does --speedups-off compile_one_forward.
    On the CPU, fp32, the compiled model's pooled states and prices are the eager model's."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

    from common.data.encode import ImageSpec, load_tokenizer
    from common.data.shards import ShardStream
    from common.model.collate import for_tokenizer
    from common.model.head import load_head
    from common.model.inference import _pooled_hidden, regression_predictor
    from common.model.loading import load_for_inference
    from common.speed import Speedups
    from common.speed.setup import apply_for_inference

    w = regression_work
    spec = ImageSpec.from_model(w.model_path)
    samples = [s for s in ShardStream(w.work_dir / "webdataset_test", spec, normalize=False)][:4]
    head, floor = load_head(w.work_dir / "train", "cpu")
    gpu = {"static_decode", "no_cudnn_attention"}  # off: they need a real GPU; compile runs on the CPU too

    def model_with(off: frozenset, decoding: bool):
        model, _ = load_for_inference(w.model_path, str(w.work_dir / "train"), "hf")
        host, _ = apply_for_inference(model, Speedups("hf", frozenset(gpu | off), cuda=True), decoding=decoding)
        layers = [m for m in model.modules() if isinstance(m, Qwen2_5_VLDecoderLayer)]
        return model, host, sum(m._compiled_call_impl is not None for m in layers), len(layers)

    lever_off = frozenset({"compile_one_forward"})
    with torch._dynamo.config.patch(specialize_float=False, optimize_ddp=True):  # compile_blocks sets them
        eager, host, compiled_layers, layers = model_with(lever_off, decoding=False)
        assert compiled_layers == 0 and layers > 0
        assert model_with(frozenset(), decoding=True)[2] == 0
        compiled, _, compiled_layers, _ = model_with(frozenset(), decoding=False)
        assert compiled_layers == layers
        batch = for_tokenizer(load_tokenizer(w.model_path), pooled=True, host_ids=host)(samples)
        with torch.no_grad():
            torch.testing.assert_close(_pooled_hidden(compiled, batch, spec), _pooled_hidden(eager, batch, spec))
        want_prices = regression_predictor(eager, head, floor, spec)(batch)
        got_prices = regression_predictor(compiled, head, floor, spec)(batch)
    torch.testing.assert_close(torch.tensor(got_prices), torch.tensor(want_prices))
