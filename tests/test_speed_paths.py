"""The fast paths give the same numbers as the plain ones: bucketed vision attention (same logits),
answer-only logits (same loss and gradients, also through the Trainer with gradient accumulation),
uint8 pixels normalized on the device (same pixel_values), length-grouped batches (every sample once,
less padding)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import CPU_PLAN, assert_close_at_scale, run_script


def tiny(model_dir, lora: bool = False):
    from common.model.loading import LoraSettings, load_for_training
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    if lora:
        model = load_for_training(str(model_dir), CPU_PLAN, LoraSettings(r=8, alpha=16), 0)
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    return model


def loss_and_grads(model, batch: dict, trainable: list) -> tuple:
    """The model's own loss (logits at every position; padding's labels are ignored) and the trainable weights'
    gradients, from a clean start."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainable]


def host_generation_batch(tok, model, samples) -> tuple[dict, torch.Tensor]:
    """A left-padded generation batch as stage 7 collates it (host-built ids), without the vision indices that
    generate() does not take, and its position ids apart."""
    from common.model.collate import for_tokenizer
    from common.speed.positions import VISION_KEYS, HostLayout
    batch = for_tokenizer(tok, "left", with_labels=False, host_ids=HostLayout.from_model(model))(samples)
    positions = batch.pop("position_ids")
    return {k: v for k, v in batch.items() if k not in VISION_KEYS}, positions


def shard_batch(encoded_demo, n: int = 6, **collator_kw):
    from common.model.collate import for_tokenizer
    from common.data.encode import ImageSpec
    from common.data.encode import load_tokenizer
    from common.data.shards import ShardStream
    spec = ImageSpec.from_model(str(encoded_demo.model_path))
    samples = [s for s in ShardStream(encoded_demo.work_dir / "webdataset_train", spec, split_by_rank=False)][:n]
    assert sum(s.get("pixel_values") is not None for s in samples) >= 2
    return for_tokenizer(load_tokenizer(str(encoded_demo.model_path)), **collator_kw)(samples)


def test_bucketed_vision_attention_matches_the_per_window_path(tiny_model_dir, encoded_demo):
    import common.speed.vision_attention as va
    from transformers import AttentionInterface
    model = tiny(tiny_model_dir).eval()
    tower = model.model.visual
    calls = []

    def counting(*a, **kw):
        calls.append(kw["cu_seq_lens_q"].numel() - 1)
        return va.bucketed_sdpa(*a, **kw)

    torch.manual_seed(1)
    # 448 px images (all windows 64 patches: the reshape path) and uneven sizes (edge windows: the grouped path)
    for grid in ([[1, 32, 32], [1, 32, 32]], [[1, 18, 10], [1, 32, 32], [1, 8, 12]]):
        grid = torch.tensor(grid)
        pixels = torch.randn(int(grid.prod(-1).sum()), 1176)
        with torch.no_grad():
            tower.config._attn_implementation = "sdpa"
            plain = tower(pixels, grid_thw=grid).pooler_output
            assert va.use_bucketed_vision_attention(model)
            AttentionInterface.register(va.NAME, counting)
            calls.clear()
            fast = tower(pixels, grid_thw=grid).pooler_output
        torch.testing.assert_close(fast, plain)
        assert len(calls) == len(tower.blocks)  # one call per layer, not one per window
        assert max(calls) > len(grid)            # ... and the window layers' call held every window
    AttentionInterface.register(va.NAME, va.bucketed_sdpa)
    # the whole model on real shard samples, text-only rows included
    batch = shard_batch(encoded_demo)
    with torch.no_grad():
        model.model.visual.config._attn_implementation = "sdpa"
        plain = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        va.use_bucketed_vision_attention(model)
        fast = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert model.config.text_config._attn_implementation == "sdpa"  # the language model is left alone
    torch.testing.assert_close(fast, plain)


def test_answer_only_logits_give_the_same_loss_and_gradients(tiny_model_dir, encoded_demo):
    from common.speed.answer_logits import answer_only_loss, answer_positions
    batch = shard_batch(encoded_demo)
    model = tiny(tiny_model_dir, lora=True).train()
    full = model(**batch)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    positions = answer_positions(batch["labels"])
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=positions)
    assert out.logits.shape[1] == len(positions) < batch["input_ids"].shape[1] // 4
    loss = answer_only_loss(out.logits, batch["labels"], positions)
    loss.backward()
    assert math.isclose(loss.item(), full.loss.item(), rel_tol=1e-6), (loss.item(), full.loss.item())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_answer_only_training_matches_full_logits_through_the_trainer(shard_work, tmp_path):
    """Two optimizer steps of 2 micro-batches each: the Trainer scales a custom loss differently from the
    model's own, so this checks the logged losses and the adapter after the steps, not only one forward."""
    def train(positions: str):
        out = tmp_path / positions
        r = run_script("6_train.py", "--work-dir", str(shard_work.work_dir), "--output-dir", str(out),
                       "--max-steps", "2", "--grad-accum", "2", "--batch-size", "4", "--workers", "0",
                       "--eval-steps", "0", "--eval-samples", "4", "--logging-steps", "1", "--learning-rate", "3e-3",
                       *([] if positions == "answer" else ["--speedups-off", "answer_only_logits"]))
        assert r.returncode == 0, r.stderr[-3000:]
        levers = next(line for line in r.stderr.splitlines() if "speed levers on:" in line)
        assert ("answer_only_logits" in levers) == (positions == "answer")
        stats = json.loads((out / "stats.json").read_text())
        from safetensors.torch import load_file
        return [h["loss"] for h in stats["log_history"] if "loss" in h], load_file(out / "adapter_model.safetensors")

    (loss_answer, weights_answer), (loss_all, weights_all) = train("answer"), train("all")
    assert len(loss_answer) == 2 and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(loss_answer, loss_all)), \
        (loss_answer, loss_all)
    for name, w in weights_all.items():
        torch.testing.assert_close(weights_answer[name], w, msg=name)


def test_length_grouped_batches_keep_every_sample_and_cut_padding():
    from common.data.streams import LengthGroupedStream
    rng = random.Random(0)
    samples = [{"sample_id": str(i), "input_ids": torch.zeros(rng.randint(300, 1200), dtype=torch.long)}
               for i in range(200)]

    def padding(stream, batch=8):
        seq = list(stream)
        chunks = [seq[i:i + batch] for i in range(0, len(seq), batch)]
        return seq, sum(max(len(s["input_ids"]) for s in c) * len(c) - sum(len(s["input_ids"]) for s in c)
                        for c in chunks)

    grouped, pad_grouped = padding(LengthGroupedStream(samples, 8, 5, seed=3))
    _, pad_plain = padding(samples)
    assert sorted(s["sample_id"] for s in grouped) == sorted(s["sample_id"] for s in samples)
    assert pad_grouped < pad_plain / 3, (pad_grouped, pad_plain)
    again, _ = padding(LengthGroupedStream(samples, 8, 5, seed=3))
    other, _ = padding(LengthGroupedStream(samples, 8, 5, seed=4))
    assert [s["sample_id"] for s in again] == [s["sample_id"] for s in grouped]  # resumable: same order
    assert [s["sample_id"] for s in other] != [s["sample_id"] for s in grouped]


def test_uint8_patches_normalized_on_the_device_equal_the_float_stream(encoded_demo):
    from common.data.encode import ImageSpec
    from common.model.predict import with_normalized_pixels
    from common.data.shards import ShardStream
    spec = ImageSpec.from_model(str(encoded_demo.model_path))
    folder = encoded_demo.work_dir / "webdataset_train"
    floats = list(ShardStream(folder, spec, split_by_rank=False))
    raw = list(ShardStream(folder, spec, split_by_rank=False, normalize=False))
    compared = 0
    for f, r in zip(floats, raw):
        assert f["sample_id"] == r["sample_id"]
        if f["pixel_values"] is None:
            continue
        assert r["pixel_values"].dtype == torch.uint8 and r["pixel_values"].shape[1] * 2 == f["pixel_values"].shape[1]
        got = with_normalized_pixels({"pixel_values": r["pixel_values"]}, spec)["pixel_values"]
        assert torch.equal(got, f["pixel_values"])
        compared += 1
    assert compared >= 5
    with pytest.raises(ValueError, match="ImageSpec"):
        with_normalized_pixels({"pixel_values": next(r["pixel_values"] for r in raw if r["pixel_values"] is not None)},
                               None)


def test_compiled_blocks_give_the_same_loss_and_gradients(tiny_model_dir, encoded_demo):
    """The compile lever (on with a GPU): every vision block and decoder layer compiled on its own; fp32 on the CPU."""
    from common.speed.answer_logits import answer_only_loss, answer_positions
    from common.speed.compile import compile_blocks
    from common.speed.vision_attention import use_bucketed_vision_attention
    batch = shard_batch(encoded_demo)
    positions = answer_positions(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def trained(compiled: bool):
        model = tiny(tiny_model_dir, lora=True).train()
        use_bucketed_vision_attention(model)
        if compiled:
            assert compile_blocks(model, True) == 2 + 4  # the tiny model's vision blocks + decoder layers
        loss = answer_only_loss(model(**inputs, logits_to_keep=positions, use_cache=False).logits, batch["labels"],
                                positions)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    with torch._dynamo.config.patch(specialize_float=False, optimize_ddp=True):  # compile_blocks sets them process-wide
        (eager, g_eager), (compiled, g_compiled) = trained(False), trained(True)
    assert math.isclose(eager, compiled, rel_tol=1e-5), (eager, compiled)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_compiled[name], g, msg=name)


def _allowed_by_the_rule(generated: list[int], digits: list[int], dot: int, end: int) -> list[int]:
    """The price grammar written out per row, as the constraint read before it ran on tensors."""
    from common.model.predict import MAX_DECIMALS, MAX_INT_DIGITS
    if generated and generated[-1] == end:
        return [end]
    if dot in generated:
        decimals = len(generated) - generated.index(dot) - 1
        return ([end] if decimals else []) + (digits if decimals < MAX_DECIMALS else [])
    if not generated:
        return digits
    return [end, dot] + (digits if len(generated) < MAX_INT_DIGITS else [])


def test_number_constraint_on_tensors_allows_exactly_the_price_grammar(tiny_model_dir):
    """Every prefix the grammar can reach (up to max_new_tokens), batched at once: the same tokens allowed,
    and the allowed scores passed through unchanged."""
    from common.data.encode import load_tokenizer
    from common.model.predict import NumberConstraint, max_new_tokens, number_tokens
    tok = load_tokenizer(str(tiny_model_dir))
    digits, dot = number_tokens(tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok("Price:")["input_ids"]
    constraint = NumberConstraint(tok, len(prompt))
    prefixes, checked = [[]], 0
    for n in range(max_new_tokens() + 1):
        ids = torch.tensor([prompt + p for p in prefixes], dtype=torch.long)
        scores = torch.randn(len(prefixes), len(tok))
        out = constraint(ids, scores)
        for row, p in enumerate(prefixes):
            want = sorted(_allowed_by_the_rule(p, digits, dot, end))
            assert torch.isfinite(out[row]).nonzero().flatten().tolist() == want, p
            assert torch.equal(out[row, want], scores[row, want])
            checked += 1
        # grow: two digits stand for all ten (the rule treats digits alike), every other allowed token kept
        prefixes = [p + [t] for p in prefixes for t in _allowed_by_the_rule(p, digits[3:5], dot, end)]
    assert checked > 1000 and all(len(p) == max_new_tokens() + 1 for p in prefixes)


def test_flops_estimate_counts_parameters_once_and_matches_the_trainer(tiny_model_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    from common.model.loading import LoraSettings, load_for_training
    from common.model.training import PriceTrainer
    model = load_for_training(str(tiny_model_dir), CPU_PLAN, LoraSettings(r=4, alpha=8), 0)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    ours = PriceTrainer(model=model, args=args, loader_options={}, eval_options={})
    plain = Trainer(model=model, args=args)
    for shape in [(2, 30), (4, 57)]:
        batch = {"input_ids": torch.zeros(shape, dtype=torch.long)}
        assert ours.floating_point_ops(batch) == plain.floating_point_ops(batch) > 0
    assert ours._flops_per_token == plain.floating_point_ops({"input_ids": torch.zeros(1)})


@pytest.mark.parametrize("constrain", [True, False])
def test_static_cache_decoder_writes_the_tokens_generate_writes(tiny_model_dir, encoded_demo, constrain):
    """The static-cache decoder (stage 7's decode on a GPU, there replayed as a CUDA graph, with grouped decode
    attention) gives the tokens the library's generate() gives on the same batches with its own model: constrained
    and free, rows with and without an image, a long batch then a short one in the cache memory the long one
    filled, a smaller last batch needing a longer cache."""
    import itertools

    from common.model.collate import for_tokenizer
    from common.speed.decode import StaticDecoder
    from common.data.encode import ImageSpec
    from common.model.loading import load_for_inference
    from common.data.encode import load_tokenizer
    from common.model.predict import NumberConstraint, max_new_tokens, with_normalized_pixels
    from common.data.shards import ShardStream
    model, _ = load_for_inference(str(tiny_model_dir), None, "hf")
    fast, _ = load_for_inference(str(tiny_model_dir), None, "hf")  # the decoder changes its model's attention
    tok = load_tokenizer(str(tiny_model_dir))
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    spec = ImageSpec.from_model(str(tiny_model_dir))
    samples = list(itertools.islice(iter(ShardStream(encoded_demo.shards_dir("train"), spec, normalize=False)), 14))
    collate = for_tokenizer(tok, "left", with_labels=False)
    samples[2] = collate.without_image(samples[2])
    samples.sort(key=lambda s: len(s["input_ids"]))
    decoder = StaticDecoder(fast, graphs=False, bucket=32, keep=2)
    assert decoder.grouped_attention and model.config.text_config._attn_implementation == "sdpa"
    for rows in (samples[6:12], samples[:6], samples[12:]):
        batch, positions = host_generation_batch(tok, fast, rows)
        inputs = with_normalized_pixels(batch, spec)
        prompt = batch["input_ids"].shape[1]
        limit = max_new_tokens() if constrain else 25
        plain = model.generate(**inputs, position_ids=positions, max_new_tokens=limit, do_sample=False,
                               logits_processor=[NumberConstraint(tok, prompt)] if constrain else None,
                               pad_token_id=tok.pad_token_id, eos_token_id=end_id)[:, prompt:]
        ours = decoder.generate(dict(inputs), positions, limit, end_id, NumberConstraint(tok, 0) if constrain else None)
        assert ours.shape == plain.shape
        ended = torch.cumsum(ours == end_id, 1) - (ours == end_id).long() > 0  # after a row's first end
        assert torch.equal(ours[~ended], plain[~ended])
        assert (plain[ended] == tok.pad_token_id).all() and (ours[ended] == end_id).all()
        assert tok.batch_decode(ours, skip_special_tokens=True) == tok.batch_decode(plain, skip_special_tokens=True)
    assert len(decoder.steps) == 2 and sorted(r for r, _ in decoder.steps) == [2, 6]  # LRU kept the last two
    # every step's cache is a view of the one arena
    assert {s.cache.layers[0].keys.data_ptr() for s in decoder.steps.values()} == {decoder.arena.keys[0].data_ptr()}
    if constrain:
        assert all(t.replace(".", "").isdigit() for t in tok.batch_decode(ours, skip_special_tokens=True))


def test_grouped_decode_attention_matches_sdpa(tiny_model_dir, encoded_demo):
    """One decode step over a left-padded cache: the language model's logits with grouped_decode_sdpa (the
    query heads of a group folded into one SDPA call) equal transformers' sdpa (key/value heads copied)."""
    import itertools

    import common.speed.decode as cd
    from common.data.encode import load_tokenizer
    from common.data.shards import ShardStream
    from common.model.loading import load_for_inference
    from common.model.predict import with_normalized_pixels
    from transformers import AttentionInterface
    model, _ = load_for_inference(str(tiny_model_dir), None, "hf")
    assert model.config.text_config.num_attention_heads > model.config.text_config.num_key_value_heads
    samples = list(itertools.islice(iter(ShardStream(encoded_demo.shards_dir("train"), encoded_demo.spec(),
                                                     normalize=False)), 5))
    batch, positions = host_generation_batch(load_tokenizer(str(tiny_model_dir)), model, samples)
    assert (batch["attention_mask"] == 0).any()
    inputs = {**with_normalized_pixels(batch, encoded_demo.spec()), "position_ids": positions}
    steps = []
    for attention in ("sdpa", cd.ATTENTION):
        if attention != "sdpa":
            assert cd.use_grouped_decode_attention(model)
        calls = []
        AttentionInterface.register(cd.ATTENTION, lambda m, q, *a, **kw: (calls.append(q.shape[2]),
                                                                          cd.grouped_decode_sdpa(m, q, *a, **kw))[1])
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
            step = model(input_ids=token, attention_mask=mask, position_ids=positions[..., -1:] + 1,
                         past_key_values=out.past_key_values, use_cache=True)
        steps.append(step.logits[:, -1])
        assert (1 in calls) == (attention != "sdpa")
    assert_close_at_scale(steps[1], steps[0])


def test_both_decoders_ignore_the_models_repetition_penalty(tiny_model_dir, encoded_demo):
    """Qwen's generation config ships a repetition penalty that generate() applies even when greedy; stage 7 and
    training's evaluation decode without it on both paths, so they give the same prices (a penalty would also
    push down digits a price repeats). A model not on sdpa attention is refused by the static decoder."""
    from common.speed.decode import StaticDecoder
    from common.model.loading import load_for_inference
    from common.data.encode import load_tokenizer
    from common.model.predict import predict_batch
    from common.speed.positions import HostLayout
    tok = load_tokenizer(str(tiny_model_dir))
    layout = HostLayout.from_model(load_for_inference(str(tiny_model_dir), None, "hf")[0])
    batch = shard_batch(encoded_demo, n=6, padding_side="left", with_labels=False, host_ids=layout)
    prices = []
    for static in (False, True):
        model, _ = load_for_inference(str(tiny_model_dir), None, "hf")
        model.generation_config.repetition_penalty = 3.0
        decoder = StaticDecoder(model, graphs=False) if static else None
        prices.append(predict_batch(model, tok, batch, spec=encoded_demo.spec(), decoder=decoder))
    assert prices[0] == prices[1] and any(p is not None for p in prices[0])
    model, _ = load_for_inference(str(tiny_model_dir), None, "hf")
    model.config.text_config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="sdpa"):
        StaticDecoder(model, graphs=False)


def test_cheap_train_calls_still_set_every_modules_mode(tiny_model_dir, tmp_path):
    """PriceTrainer makes model.train() skip its module walk when nothing would change; every mode change,
    including one made to a single submodule behind the model's back, still reaches every module."""
    from transformers import TrainingArguments

    from common.model.loading import LoraSettings, load_for_training
    from common.model.training import PriceTrainer
    model = load_for_training(str(tiny_model_dir), CPU_PLAN, LoraSettings(r=4, alpha=8, dropout=0.1), 0)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = PriceTrainer(model=model, args=args, loader_options={}, eval_options={})
    modules = list(model.modules())

    def modes():
        return {m.training for m in modules}
    assert trainer.model.train() is model and modes() == {True}
    model.eval()
    assert modes() == {False}
    model.train()
    assert modes() == {True}
    dropout = next(m for m in modules if isinstance(m, torch.nn.Dropout))
    dropout.eval()  # switched on its own, as evaluation helpers or libraries may do
    model.train()
    assert dropout.training and modes() == {True}
    block = model.base_model.model.model.language_model.layers[0]
    model.train(False)
    block.train(True)
    model.eval()
    assert modes() == {False}


def test_compiled_blocks_stay_one_graph_each_under_ddp(tiny_model_dir, tmp_path):
    """A compiled block with more trainable bytes than DDP's 1 MB first bucket (a 3B decoder layer holds 3.3 MB of
    LoRA weights) would be cut in two by torch.compile under DDP; compile_blocks turns that cut off."""
    import gc

    import torch.distributed as dist
    from torch._dynamo.testing import CompileCounter

    from common.speed.compile import compile_blocks

    class Block(torch.nn.Module):  # a class of its own: dynamo does not compile torch.nn's own forwards
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    with torch._dynamo.config.patch(optimize_ddp=True, specialize_float=False):  # PyTorch's defaults, restored after
        assert compile_blocks(tiny(tiny_model_dir, lora=True), True) > 0
        assert torch._dynamo.config.optimize_ddp is False
        torch.manual_seed(0)
        block = Block()
        assert sum(p.numel() * 4 for p in block.parameters()) > 2**20
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), block, torch.nn.Linear(256, 1))
        counter = CompileCounter()
        block.compile(backend=counter)
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
        try:
            torch._dynamo.reset()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            ddp(torch.randn(8, 256)).sum().backward()
            # DDP's reducer holds the process group: freed at this frame's end, after the group is destroyed, it
            # would join gloo's worker threads holding the GIL while a worker may need it to free a finished work
            # (a deadlock seen once in CI); let it go while the group is still registered
            del ddp
            gc.collect()
            assert counter.frame_count == 1
            assert all(p.grad is not None for p in model.parameters())
        finally:
            dist.destroy_process_group()
            torch._dynamo.reset()


def test_training_collator_drops_a_needless_mask_and_names_a_sample_with_wrong_image_tokens(tiny_model_dir,
                                                                                            encoded_demo):
    from common.model.collate import check_image_tokens, for_tokenizer
    from common.data.encode import ImageSpec
    from common.data.encode import load_tokenizer
    from common.speed.positions import HostLayout
    from common.data.shards import ShardStream
    layout = HostLayout.from_model(tiny(tiny_model_dir))
    spec = ImageSpec.from_model(str(encoded_demo.model_path))
    sample = next(s for s in ShardStream(encoded_demo.work_dir / "webdataset_train", spec, split_by_rank=False)
                  if s.get("pixel_values") is not None)
    batch = for_tokenizer(load_tokenizer(str(encoded_demo.model_path)), host_ids=layout)([sample])
    assert "attention_mask" not in batch and "position_ids" in batch  # nothing padded: attention runs causal
    check_image_tokens(sample, layout)
    cut = (sample["input_ids"] == layout.image_token_id).nonzero()[0, 0]
    broken = dict(sample, input_ids=torch.cat([sample["input_ids"][:cut], sample["input_ids"][cut + 1:]]))
    with pytest.raises(ValueError, match=f"sample {sample['sample_id']}: .* image tokens"):
        check_image_tokens(broken, layout)


def test_host_built_training_batch_gives_the_librarys_loss_and_gradients(tiny_model_dir, encoded_demo):
    """The host-ids collator's training batch: no attention mask (right padding follows every real token, so
    attention causal alone), position ids built on the host, image tokens checked on the host instead of the
    model's GPU check (skip_image_readbacks). Same loss and gradients as the library's path on the plain batch."""
    from common.model.predict import with_normalized_pixels
    from common.speed.positions import HostLayout, skip_image_readbacks
    model = tiny(tiny_model_dir, lora=True)
    plain = with_normalized_pixels(shard_batch(encoded_demo, n=6), None)
    host = with_normalized_pixels(shard_batch(encoded_demo, n=6, host_ids=HostLayout.from_model(model)), None)
    assert (plain["attention_mask"] == 0).any() and "pixel_values" in host  # the demo batch is padded, with images
    assert "attention_mask" not in host and "position_ids" in host
    assert torch.equal(plain["input_ids"], host["input_ids"]) and torch.equal(plain["labels"], host["labels"])
    trainable = [p for p in model.parameters() if p.requires_grad]

    want = loss_and_grads(model, plain, trainable)
    skip_image_readbacks(model)
    got = loss_and_grads(model, host, trainable)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)


def test_compiled_blocks_take_the_models_floats_as_constants(tiny_model_dir):
    """With dynamic shapes Dynamo turns each float attribute (RMSNorm eps, attention and LoRA scaling) into a 0-d CPU
    tensor input read with .item(), which Inductor builds CPU kernels for; compile_blocks makes them constants.
    The blocks' traced graphs show it (a capturing backend, on the CPU)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock

    from common.speed.compile import compile_blocks

    def float_reads(ours: bool) -> list[int]:
        with torch._dynamo.config.patch(specialize_float=False, optimize_ddp=True):  # PyTorch's defaults
            model = tiny(tiny_model_dir, lora=True)
            if ours:
                compile_blocks(model, True)
            torch._dynamo.reset()
            codes = []

            def capture(gm, example_inputs):
                codes.append(gm.code)
                return gm.forward
            for block in model.modules():
                if isinstance(block, (Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock)):
                    block.compile(backend=capture, dynamic=True)
            grid = torch.tensor([[1, 16, 16]])
            ids = torch.randint(0, 500, (1, 40))
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            with torch.no_grad():
                model.base_model.model.model.visual(torch.randn(256, 3 * 2 * 14 * 14), grid_thw=grid)
            torch._dynamo.reset()
            return [code.count(".item()") for code in codes]

    plain = float_reads(False)
    assert plain and sum(plain) >= 10, plain  # a decoder layer alone reads 10 floats
    assert sum(float_reads(True)) == 0
    assert not torch._dynamo.config.specialize_float


def vision_mlps(model):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP
    return [m for m in model.modules() if isinstance(m, Qwen2_5_VLMLP)]


def test_padded_vision_mlp_gives_the_same_loss_and_gradients(tiny_model_dir, encoded_demo):
    """The vision_mlp_padding lever: the frozen vision MLP's width zero-padded (the tiny model's 128 -> 144 here; the 3B's
    3,420 -> 3,456) leaves the loss and the LoRA gradients as they were (fp32 on the CPU)."""
    from common.model.predict import with_normalized_pixels
    from common.speed.vision_mlp import pad_vision_mlp
    model = tiny(tiny_model_dir, lora=True)
    batch = with_normalized_pixels(shard_batch(encoded_demo, n=6), None)
    trainable = [p for p in model.parameters() if p.requires_grad]

    want = loss_and_grads(model, batch, trainable)
    mlps = vision_mlps(model)
    assert pad_vision_mlp(model, 48) == len(mlps) > 0
    assert all(m.gate_proj.out_features == m.up_proj.out_features == m.down_proj.in_features == 144 for m in mlps)
    assert [p for p in model.parameters() if p.requires_grad] == trainable  # the LoRA weights, untouched
    got = loss_and_grads(model, batch, trainable)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)
    assert pad_vision_mlp(model, 48) == 0  # already a multiple


def test_padded_vision_mlp_leaves_inference_logits_and_trainable_vision_layers_alone(tiny_model_dir, encoded_demo):
    from common.model.loading import LoraSettings, load_for_training
    from common.model.predict import with_normalized_pixels
    from common.speed.vision_mlp import pad_vision_mlp
    model = tiny(tiny_model_dir).eval().requires_grad_(False)  # as load_for_inference gives it
    batch = with_normalized_pixels(shard_batch(encoded_demo, n=6, padding_side="left", with_labels=False), None)
    with torch.no_grad():
        want = model(**batch).logits
        assert pad_vision_mlp(model, 48) == len(vision_mlps(model))
        got = model(**batch).logits
    torch.testing.assert_close(got, want)
    # LoRA on the vision tower (--tune-vision): its layers keep the shapes their adapters are saved with
    tuned = load_for_training(str(tiny_model_dir), CPU_PLAN, LoraSettings(r=8, alpha=16, tune_vision=True), 0)
    assert pad_vision_mlp(tuned, 48) == 0
    assert all(m.down_proj.in_features == 128 for m in vision_mlps(tuned))


def test_training_forward_takes_the_collators_vision_indices(tiny_model_dir, encoded_demo, monkeypatch):
    """With skip_image_readbacks (training, hf backend) the vision tower takes the indices the host-ids collator
    built (`image_position_ids`, `image_cu_seqlens`, `image_window_index`, ...) instead of rebuilding them from the
    grids on the device, which reads the grids back every step; the loss is the one the library's path gives."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    from common.model.predict import with_normalized_pixels
    from common.speed.positions import HostLayout, skip_image_readbacks
    model = tiny(tiny_model_dir, lora=True)
    layout = HostLayout.from_model(model)
    batch = with_normalized_pixels(shard_batch(encoded_demo, n=6, host_ids=layout), None)
    plain = {k: v for k, v in batch.items() if not k.startswith("image_") or k == "image_grid_thw"}
    handed = []
    for name, key in (("get_vision_position_ids", "position_ids"), ("get_vision_attention_seqlens", "cu_seqlens"),
                      ("get_vision_window_index", "window_index")):
        def recording(*a, _original=getattr(qwen, name), _key=key, **kw):
            handed.append((kw.get("kwargs") or {}).get(_key) is not None)
            return _original(*a, **kw)
        monkeypatch.setattr(qwen, name, recording)
    with torch.no_grad():
        want = model(**plain).loss
        assert handed == [False] * 3  # the library's path without them: built from the grids
        skip_image_readbacks(model)
        handed.clear()
        got = model(**batch).loss
        assert handed == [True] * 3
    torch.testing.assert_close(got, want)


def test_steps_keep_the_thread_count_a_pin_memory_thread_changes():
    """DataLoader's pin-memory thread sets torch's thread count to 1 as each loader starts; with the count given
    back at each step, a compiled block run again in a thread started later (autograd's GPU thread, recomputing a
    checkpointed layer) finds the count it was compiled with, and does not compile again."""
    import threading

    from torch._dynamo.testing import CompileCounter

    from common.speed.compile import KeepThreadCount

    def in_new_thread(fn, *args):
        out = []
        thread = threading.Thread(target=lambda: out.append(fn(*args)))
        thread.start()
        thread.join()
        return out[0]

    given = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        keep, counter = KeepThreadCount(), CompileCounter()
        block = torch.compile(lambda x: x * 2 + 1, backend=counter, dynamic=False)
        for _epoch in range(2):
            in_new_thread(torch.set_num_threads, 1)  # what the loader's pin-memory thread does first
            keep.on_step_begin(None, None, None)
            block(torch.ones(4))                     # the forward, in the main thread
            in_new_thread(block, torch.ones(4))      # the recomputation, in a thread started after
            assert torch.get_num_threads() == 3
            assert in_new_thread(torch.get_num_threads) == 3
        assert counter.frame_count == 1
    finally:
        torch.set_num_threads(given)
        torch._dynamo.reset()
