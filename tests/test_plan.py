"""The GPU plan (common.model.plan): what each card gets, the global batch kept whatever the card, the user's
options kept, and the out-of-memory backoff that keeps learning the same."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common.model.plan import (SAFETY, Device, ModelSize, Request, plan_inference, plan_training, problems,
                               step_seconds, training_gib)
from conftest import load_stage

# Qwen2.5-VL-3B's shape, as ModelSize.of counts it (checked below against a config built here)
QWEN3B = ModelSize(params=3_754_622_976, linear_params=3_752_361_984, layers=36, hidden=2048, intermediate=11008,
                   lora_params=29_933_568)
CARDS = {"H200": Device("NVIDIA H200", 139.8, True), "H100": Device("NVIDIA H100 80GB HBM3", 79.2, True),
         "A100-40": Device("NVIDIA A100-SXM4-40GB", 39.4, True), "RTX 4090": Device("NVIDIA GeForce RTX 4090", 23.6, True),
         "L4": Device("NVIDIA L4", 22.0, True), "T4": Device("Tesla T4", 14.6, False)}


def test_model_size_is_counted_from_the_config_alone(tmp_path):
    from transformers import Qwen2_5_VLConfig
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  fullatt_block_indexes=[7, 15, 23, 31])
    Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True).save_pretrained(tmp_path)
    assert ModelSize.of(str(tmp_path)) == QWEN3B


@pytest.mark.parametrize("card", sorted(CARDS))
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("budget", [0, 16, 24, 48])
def test_every_plan_keeps_the_global_batch_and_fits_the_budget(card, world, budget):
    device = CARDS[card]
    plan = plan_training(Request(global_batch=16, world=world, max_gpu_memory=budget, tokens=700), device, QWEN3B)
    assert plan.micro_batch * plan.grad_accum * world == 16
    assert plan.dtype == ("bfloat16" if device.bf16 else "float16")
    limit = min(device.total_gib, budget or device.total_gib)
    assert plan.budget_gib == round(limit, 1) and plan.estimate_gib <= limit * SAFETY + 0.05
    assert plan.estimate_gib == round(training_gib(QWEN3B, plan.base_precision, plan.dtype, plan.micro_batch, 700,
                                                   plan.checkpoint_every), 1)


def test_big_cards_train_fastest_and_small_ones_recompute():
    big = plan_training(Request(tokens=700), CARDS["H200"], QWEN3B)
    assert (big.backend, big.base_precision, big.micro_batch, big.grad_accum, big.checkpoint_every) == \
        ("hf", "16bit", 16, 1, 0)
    small = plan_training(Request(tokens=700), CARDS["T4"], QWEN3B)
    assert small.checkpoint_every > 0 and small.base_precision == "16bit" and small.dtype == "float16"
    # 16-bit weights do not fit 6 GiB: a 4-bit base does
    assert plan_training(Request(tokens=700, max_gpu_memory=6), CARDS["H200"], QWEN3B).base_precision == "4bit"
    # a budget nothing fits in: the smallest footprint allowed, said why
    tiny = plan_training(Request(tokens=700, max_gpu_memory=3), CARDS["H200"], QWEN3B)
    assert (tiny.base_precision, tiny.micro_batch, tiny.checkpoint_every) == ("4bit", 1, 1)
    assert "nothing is estimated to fit" in tiny.why


def test_the_step_time_model_ranks_configurations_as_they_were_measured():
    """Stage 6's median optimizer steps on an H200 (bench/RESULTS.md's budget table), 16 samples each: 16 x 1 in
    0.27-0.30 s, 16 x 1 recomputing every layer 0.36 s, 8 x 2 0.45 s, 8 x 2 recomputing every layer 0.68 s."""
    def step(micro, every):
        return step_seconds(QWEN3B, micro, 616, every) * (16 // micro)
    assert step(16, 0) < step(16, 1) < step(8, 0) < step(8, 1)


def test_a_bigger_budget_never_plans_a_slower_step():
    """48 and 80 GiB once planned 8 x 2 without recomputation, measured slower than 24 GiB's 16 x 1 with it."""
    plans = {budget: plan_training(Request(tokens=900, tokens_mean=616, max_gpu_memory=budget), CARDS["H200"], QWEN3B)
             for budget in (16, 24, 48, 80, 0)}
    times = [p.grad_accum * step_seconds(QWEN3B, p.micro_batch, 616, p.checkpoint_every) for p in plans.values()]
    assert times == sorted(times, reverse=True)
    assert all(plans[budget].micro_batch == 16 for budget in (24, 48, 80, 0))


def test_each_micro_batch_gets_the_least_recomputation_that_fits():
    """The levels' limits are where the estimate crosses the budget, and the longest sample's batch fits at its
    level."""
    for card in CARDS.values():
        for budget in (0, 24, 48):
            plan = plan_training(Request(tokens=901, tokens_mean=536, tokens_max=1318, max_gpu_memory=budget), card,
                                 QWEN3B)
            room = plan.budget_gib * SAFETY + 0.05
            assert [every for every, _ in plan.recompute_limits] == [0, 4, 2, 1]
            for every, most in plan.recompute_limits:
                assert training_gib(QWEN3B, plan.base_precision, plan.dtype, 1, most, every) <= room
                assert training_gib(QWEN3B, plan.base_precision, plan.dtype, 1, most + 2, every) > room - 0.05
                assert plan.every_for(most) == every
            longest = plan.micro_batch * 1318
            assert training_gib(QWEN3B, plan.base_precision, plan.dtype, 1, longest, plan.every_for(longest)) <= room
            assert plan.estimate_gib <= room
            assert plan.every_for(plan.micro_batch * 901) == plan.checkpoint_every  # the usual batch's level


def test_an_h100_trains_the_usual_batch_without_recomputing_and_the_longest_with_it():
    """The bench data on an H100: 16 x 1 with no recomputation fit its 320 rows (peak 63.8 GiB) and ran out at
    step 20 of its 512 rows (longest sample 1318 tokens): a level for the whole run had to recompute every 2nd
    layer throughout (0.75 of the speed)."""
    plan = plan_training(Request(tokens=901, tokens_mean=536, tokens_max=1318), CARDS["H100"], QWEN3B)
    assert (plan.micro_batch, plan.checkpoint_every) == (16, 0)
    assert plan.every_for(16 * 1055) == 0 and plan.every_for(16 * 1318) > 0
    assert "recomputing no layer up to" in plan.line() and "every layer beyond" in plan.line()


def test_recomputation_given_or_under_unsloth_is_one_level_for_the_run():
    request = Request(tokens=901, tokens_mean=536, tokens_max=1318)
    for change in ({"checkpointing": "on"}, {"checkpointing": "off"}, {"backend": "unsloth"}):
        plan = plan_training(dataclasses.replace(request, **change), CARDS["H100"], QWEN3B)
        assert plan.recompute_limits == () and plan.every_for(10**6) == plan.checkpoint_every
    unsloth = plan_training(dataclasses.replace(request, backend="unsloth"), CARDS["H100"], QWEN3B)
    assert unsloth.checkpoint_every > 0  # one level: the longest batch's


def test_unsloth_is_planned_with_its_own_memory_and_recomputation():
    """Unsloth recomputes every layer or none (its one switch), keeps more activations than the hf path (16 x 1 on
    an H100, longest sample 1055 tokens: 77.4 GiB measured against 63.8) and compiles its own layers."""
    request = Request(tokens=901, tokens_mean=536, tokens_max=1055)
    hf = plan_training(request, CARDS["H100"], QWEN3B)
    for card in CARDS.values():
        for budget in (0, 16, 24):
            plan = plan_training(dataclasses.replace(request, backend="unsloth", max_gpu_memory=budget), card, QWEN3B)
            assert plan.checkpoint_every in (0, 1) and plan.estimate_gib <= plan.budget_gib * SAFETY
            assert "compiled by Unsloth" in plan.line()
    assert training_gib(QWEN3B, "16bit", "bfloat16", 16, 1055, 0, "unsloth") == pytest.approx(77.4, abs=1)
    assert hf.estimate_gib == pytest.approx(63.8, abs=1) and (hf.micro_batch, hf.checkpoint_every) == (16, 0)
    # 77.4 GiB is beyond the H100's 90%: Unsloth recomputes there, where the hf path fits without
    unsloth = plan_training(dataclasses.replace(request, backend="unsloth"), CARDS["H100"], QWEN3B)
    assert unsloth.checkpoint_every == 1


def test_the_level_is_set_per_batch_and_recomputes_what_it_says(tiny_model_dir, encoded_demo):
    """The tiny model, one real batch, at each level: the layers marked recompute (their forward runs again in the
    backward, the others' once), and the gradients are the same at every level."""
    import itertools

    from common.data.encode import load_tokenizer
    from common.data.shards import ShardStream
    from common.model.collate import for_tokenizer
    from common.model.loading import LoraSettings, load_for_training
    from common.model.predict import with_normalized_pixels
    from common.model.recompute import Recompute
    from conftest import CPU_PLAN
    samples = list(itertools.islice(iter(ShardStream(encoded_demo.shards_dir("train"), encoded_demo.spec(),
                                                     normalize=False)), 4))
    batch = with_normalized_pixels(for_tokenizer(load_tokenizer(str(tiny_model_dir)))(samples), encoded_demo.spec())
    n = batch["input_ids"].numel()
    limits = ((0, n - 1), (2, 2 * n), (1, 10**9))  # this batch: every 2nd layer; twice its size and more: every one
    plan = dataclasses.replace(CPU_PLAN, recompute_limits=limits)
    model = load_for_training(str(tiny_model_dir), plan, LoraSettings(r=4, alpha=8), 0).train()
    recompute = Recompute(plan, model, tune_vision=False)
    assert len(recompute.decoder) == 4
    calls = [0] * 4
    for i, layer in enumerate(recompute.decoder):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    grads = {}
    for size, want in ((n // 2, 0), (n, 2), (4 * n, 1)):
        model.zero_grad()
        calls[:] = [0] * 4
        assert recompute.for_batch(torch.zeros(size)) == want
        model(**batch).loss.backward()
        marked = [want and i % want == 0 for i in range(4)]
        assert [layer.gradient_checkpointing for layer in recompute.decoder] == [bool(m) for m in marked]
        assert calls == [2 if m else 1 for m in marked]
        grads[want] = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    for want in (2, 1):
        for k, g in grads[0].items():
            torch.testing.assert_close(grads[want][k], g, msg=k)
    assert recompute.summary() == {"0": 1, "1": 1, "2": 1}


def test_an_option_given_is_kept_and_not_listed_as_chosen():
    request = Request(micro_batch=2, checkpointing="off", dtype="float16", base_precision="4bit", tokens=700)
    plan = plan_training(request, CARDS["H100"], QWEN3B)
    assert (plan.micro_batch, plan.grad_accum, plan.checkpoint_every, plan.dtype, plan.base_precision) == \
        (2, 8, 0, "float16", "4bit")
    assert set(plan.chosen) == {"backend", "accumulation"}
    assert "micro-batch 2 x 8 accumulation x 1 rank(s) = 16" in plan.line()
    cpu = plan_training(Request(global_batch=8), None, QWEN3B)
    assert (cpu.device, cpu.dtype, cpu.micro_batch, cpu.grad_accum, cpu.compiled) == ("CPU", "float32", 8, 1, False)


def test_options_that_cannot_make_a_plan_are_all_reported():
    found = problems(Request(global_batch=10, world=4, dtype="bfloat16", max_gpu_memory=8), None)
    assert any("--global-batch-size 10 must be a positive multiple of the 4 rank(s)" in p for p in found)
    assert any("--dtype bfloat16 needs a CUDA GPU" in p for p in found)
    assert any("--max-gpu-memory needs a CUDA GPU" in p for p in found)
    assert problems(Request(global_batch=16, micro_batch=3), CARDS["L4"]) == [
        "--batch-size 3 must divide the 16 samples each rank contributes to --global-batch-size 16"]
    assert problems(Request(micro_batch=4, grad_accum=2), CARDS["L4"]) == [
        "--batch-size 4 x --grad-accum 2 x 1 rank(s) != --global-batch-size 16"]
    assert "has no bf16" in problems(Request(dtype="bfloat16"), CARDS["T4"])[0]


def test_inference_batches_fit_the_budget():
    assert plan_inference(0, "hf", "bfloat16", "graphs", CARDS["H100"], QWEN3B, 900).batch == 64
    capped = plan_inference(0, "hf", "float16", "graphs", CARDS["H100"], QWEN3B, 900, max_gpu_memory=10)
    assert capped.batch < 64 and capped.estimate_gib <= 10 * SAFETY
    assert plan_inference(12, "hf", "bfloat16", "graphs", CARDS["T4"], QWEN3B, 900).batch == 12  # given: kept
    assert plan_inference(0, "hf", "float32", "generate", None, QWEN3B, 900).batch == 32


# ------------------------------------------------------------------------------------------- through stage 6

def stage6(work_dir, out, *extra):
    from common import options
    stage = load_stage("6_train")
    cfg = options.parse(stage.TrainConfig, ["--work-dir", str(work_dir), "--output-dir", str(out), "--workers", "0",
                                            "--eval-steps", "0", "--eval-samples", "4", "--logging-steps", "1",
                                            "--learning-rate", "3e-3", *extra])
    return stage.main(cfg)


def adapter(out):
    from safetensors.torch import load_file
    return load_file(out / "adapter_model.safetensors")


def test_the_same_global_batch_learns_the_same_in_any_split(shard_work, tmp_path):
    """8 samples a step as one micro-batch of 8, or two of 4 accumulated: the loss is normalized over the step's
    answer tokens, so the losses and the adapter agree to rounding (Adam divides by the gradients' size: rounding
    shows most where they are near zero, so the weights are held to 1% of an update's size)."""
    split = ["--max-steps", "3", "--no-group-by-length"]  # grouping cuts windows by the micro-batch: other batches
    one = stage6(shard_work.work_dir, tmp_path / "one", *split, "--batch-size", "8", "--grad-accum", "1")
    two = stage6(shard_work.work_dir, tmp_path / "two", *split, "--batch-size", "4", "--grad-accum", "2")
    assert (one["plan"]["micro_batch"], two["plan"]["micro_batch"], two["plan"]["grad_accum"]) == (8, 4, 2)
    losses = [[h["loss"] for h in s["log_history"] if "loss" in h] for s in (one, two)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]))
    for name, w in adapter(tmp_path / "one").items():
        assert (adapter(tmp_path / "two")[name] - w).abs().max() <= 0.01 * 3e-3, name


def _oom_at(monkeypatch, rows: int, after_calls: int = 0):
    from common.model.training import PriceTrainer
    real = PriceTrainer.compute_loss
    calls = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        calls.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] >= rows and len(calls) > after_calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(PriceTrainer, "compute_loss", compute_loss)
    return calls


def test_out_of_memory_halves_the_micro_batch_and_trains_as_a_run_started_there(shard_work, tmp_path, monkeypatch):
    calls = _oom_at(monkeypatch, rows=8)
    backed_off = stage6(shard_work.work_dir, tmp_path / "auto", "--max-steps", "3", "--global-batch-size", "8")
    assert calls[0] == 8 and set(calls[1:]) == {4}  # the planned micro-batch of 8 ran out; 4 x 2 from then on
    assert (backed_off["plan"]["micro_batch"], backed_off["plan"]["grad_accum"]) == (4, 2)
    monkeypatch.undo()
    started = stage6(shard_work.work_dir, tmp_path / "four", "--max-steps", "3", "--global-batch-size", "8",
                     "--batch-size", "4")
    assert [h["loss"] for h in backed_off["log_history"] if "loss" in h] == \
        [h["loss"] for h in started["log_history"] if "loss" in h]
    for name, w in adapter(tmp_path / "four").items():
        assert torch.equal(adapter(tmp_path / "auto")[name], w), name


def test_out_of_memory_with_a_given_micro_batch_is_one_line_and_keeps_the_checkpoints(shard_work, tmp_path,
                                                                                      monkeypatch):
    from common.model.backoff import OutOfGpuMemory
    from common.model.checkpoints import latest_complete_checkpoint
    _oom_at(monkeypatch, rows=4, after_calls=2)  # steps 1 and 2 run, step 3 runs out
    with pytest.raises(OutOfGpuMemory) as err:
        stage6(shard_work.work_dir, tmp_path / "given", "--max-steps", "4", "--batch-size", "4", "--grad-accum", "1",
               "--save-steps", "2")
    message = str(err.value)
    assert "\n" not in message and "micro-batch 4 x 1 accumulation" in message and "--batch-size" in message
    assert latest_complete_checkpoint(tmp_path / "given").name == "checkpoint-2"


def test_an_inference_batch_that_runs_out_is_predicted_in_halves():
    from common.model.inference import _fitting

    def predict(batch):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [x * 10 for x in batch]

    assert _fitting(predict, lambda s: s, [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == ([10, 20, 30, 40, 50], 2)
    with pytest.raises(torch.OutOfMemoryError):
        _fitting(lambda b: predict(b * 3), lambda s: s, [1], [1])
