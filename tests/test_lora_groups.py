"""--lora-groups (common/lora_fusion.py): the q/k/v and gate/up LoRA projections run as one group each give peft's
numbers: the same loss, gradients, generated tokens and saved adapter, with no memory added and no graph break."""
from __future__ import annotations

import json
import math

import torch

from conftest import run_script
from test_speed_paths import loss_and_grads, shard_batch, tiny


def tiny_trained_lora(model_dir):
    """The tiny model with LoRA whose B matrices are not zero (as after training), so that A gets gradients too."""
    model = tiny(model_dir, lora=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def test_grouped_lora_gives_peft_s_loss_gradients_and_tokens(tiny_model_dir, encoded_demo):
    from peft import get_peft_model_state_dict

    from common.speed.lora_groups import fuse_shared_input_lora
    batch = shard_batch(encoded_demo)
    plain, grouped = tiny_trained_lora(tiny_model_dir), tiny_trained_lora(tiny_model_dir)
    layers = grouped.base_model.model.model.language_model.layers
    adapter_before = get_peft_model_state_dict(grouped)
    assert fuse_shared_input_lora(grouped) == 2 * len(layers)
    assert fuse_shared_input_lora(grouped) == 0  # already grouped

    attention, mlp = layers[0].self_attn, layers[0].mlp
    # the base weights live in the stacked tensor: views, not copies
    assert attention.q_proj.base_layer.weight.data_ptr() == attention.stacked_base_weight.data_ptr()
    assert attention.v_proj.base_layer.bias.untyped_storage().data_ptr() == \
        attention.stacked_base_bias.untyped_storage().data_ptr()
    assert mlp.up_proj.base_layer.weight.untyped_storage().data_ptr() == \
        mlp.stacked_base_weight.untyped_storage().data_ptr()
    assert mlp.stacked_base_bias is None
    # the adapter is peft's own: same trainable parameters, same saved keys and values
    trainable = [p for p in grouped.parameters() if p.requires_grad]
    assert [n for n, p in grouped.named_parameters() if p.requires_grad] == \
        [n for n, p in plain.named_parameters() if p.requires_grad]
    adapter_after = get_peft_model_state_dict(grouped)
    assert adapter_after.keys() == adapter_before.keys() and all(
        torch.equal(adapter_after[k], v) for k, v in adapter_before.items())

    want = loss_and_grads(plain.train(), batch, [p for p in plain.parameters() if p.requires_grad])
    got = loss_and_grads(grouped.train(), batch, trainable)
    torch.testing.assert_close(got[0], want[0])
    assert all(g.abs().sum() > 0 for g in want[1])  # A and B both learn
    names = [n for n, p in grouped.named_parameters() if p.requires_grad]
    for name, g, w in zip(names, got[1], want[1]):  # fp32 rounding: larger GEMMs sum in another order
        torch.testing.assert_close(g, w, msg=name)

    # the key/value cache path: generation writes the same tokens
    prompt = shard_batch(encoded_demo, n=3, padding_side="left", with_labels=False)
    with torch.no_grad():
        tokens = [m.eval().generate(**prompt, max_new_tokens=6, do_sample=False) for m in (plain, grouped)]
    assert torch.equal(tokens[0], tokens[1])


def test_grouped_lora_follows_peft_s_switches_and_unequal_ranks(tiny_model_dir, encoded_demo):
    """Disabling, merging or unloading the adapter after grouping, and per-layer ranks: the grouped model gives what
    peft gives (a group that no longer qualifies runs the library's forward)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from common.speed.lora_groups import fuse_shared_input_lora
    from common.model.loading import LANGUAGE_TARGETS
    batch = shard_batch(encoded_demo, n=3)

    def model(ranks: dict | None = None):
        torch.manual_seed(0)
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LANGUAGE_TARGETS,
                                                     rank_pattern=ranks or {}))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        return peft_model.eval()

    def logits(m):
        with torch.no_grad():
            return m(**batch).logits

    def close(a, b) -> bool:
        return (a - b).abs().max() <= 1e-5 * b.abs().max()

    uneven = {"k_proj": 4, "up_proj": 12}  # the block-diagonal B's offsets follow each layer's own rank
    plain, grouped = model(uneven), model(uneven)
    assert fuse_shared_input_lora(grouped) == 8
    assert grouped.base_model.model.model.language_model.layers[0].self_attn.k_proj.lora_A["default"].out_features == 4
    lora_on = logits(plain)
    assert close(logits(grouped), lora_on)
    with plain.disable_adapter(), grouped.disable_adapter():
        lora_off = logits(plain)
        assert not close(lora_off, lora_on) and close(logits(grouped), lora_off)
    plain.merge_adapter()
    grouped.merge_adapter()  # merges into the views, so into the stack: counted once
    assert close(logits(grouped), lora_on)
    grouped.unmerge_adapter()
    assert close(logits(grouped), lora_on)
    unloaded = grouped.merge_and_unload()
    assert close(logits(unloaded), lora_on)
    unloaded.to(torch.float64)  # plain Linear layers now: nothing to view again
    assert unloaded.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float64


def test_grouped_lora_keeps_one_copy_of_the_base_weights_when_moved(tiny_model_dir):
    """.to() moves the stacked tensor and each layer's view on their own; the group views the moved stack again."""
    import gc
    import weakref

    from common.speed.lora_groups import fuse_shared_input_lora
    model = tiny_trained_lora(tiny_model_dir)
    attention = model.base_model.model.model.language_model.layers[0].self_attn
    mlp = model.base_model.model.model.language_model.layers[0].mlp
    old = weakref.ref(attention.k_proj.base_layer.weight)
    fuse_shared_input_lora(model)
    gc.collect()
    assert old() is None  # the weight it replaced is gone
    model.to(torch.float64)
    for module, layers in ((attention, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
        assert module.stacked_base_weight.dtype == torch.float64
        start = module.stacked_base_weight.data_ptr()
        for name in layers:
            weight = getattr(module, name).base_layer.weight
            assert weight.dtype == torch.float64 and weight.data_ptr() == start
            start += weight.numel() * weight.element_size()
    assert attention.v_proj.base_layer.bias.untyped_storage().data_ptr() == \
        attention.stacked_base_bias.untyped_storage().data_ptr()


def test_grouped_lora_compiles_without_a_graph_break(tiny_model_dir, encoded_demo):
    from torch._dynamo.testing import CompileCounter
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

    from common.speed.lora_groups import fuse_shared_input_lora
    batch = shard_batch(encoded_demo)

    def graphs(grouped: bool) -> int:
        model = tiny_trained_lora(tiny_model_dir).train()
        if grouped:
            fuse_shared_input_lora(model)
        counter = CompileCounter()
        torch._dynamo.reset()
        for layer in (m for m in model.modules() if isinstance(m, Qwen2_5_VLDecoderLayer)):
            layer.compile(backend=counter, dynamic=True)
        model(**batch, use_cache=False).loss.backward()
        return counter.frame_count

    try:
        plain = graphs(False)
        assert plain >= 1 and graphs(True) == plain
    finally:
        torch._dynamo.reset()


def test_grouped_lora_trains_and_saves_the_same_adapter_through_the_trainer(shard_work, tmp_path, monkeypatch):
    """Stage 6 in this process, the lever on as a GPU would have it (it is off on the CPU to keep the CPU's
    numbers the library's): the same losses and, within rounding, the same saved adapter."""
    import dataclasses

    from common import options
    from common.speed import LEVERS
    from conftest import load_stage
    learning_rate = 3e-3
    stage = load_stage("6_train")

    def train(grouped: bool):
        out = tmp_path / str(grouped)
        monkeypatch.setitem(LEVERS, "lora_groups", dataclasses.replace(LEVERS["lora_groups"], gpu_only=not grouped))
        cfg = options.parse(stage.TrainConfig, [
            "--work-dir", str(shard_work.work_dir), "--output-dir", str(out), "--max-steps", "2", "--grad-accum", "2",
            "--batch-size", "4", "--workers", "0", "--eval-steps", "0", "--eval-samples", "4", "--logging-steps", "1",
            "--learning-rate", str(learning_rate)])
        stats = stage.main(cfg)
        assert ("lora_groups" in stats["speed_levers"]) is grouped
        from safetensors.torch import load_file
        return [h["loss"] for h in stats["log_history"] if "loss" in h], load_file(out / "adapter_model.safetensors")

    (loss_grouped, weights_grouped), (loss_plain, weights_plain) = train(True), train(False)
    assert len(loss_grouped) == 2 and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(loss_grouped, loss_plain))
    assert weights_grouped.keys() == weights_plain.keys()
    for name, w in weights_plain.items():  # Adam divides by the gradients' size: fp32 rounding shows most where
        # they are near zero. Within 1% of an update's size (the learning rate)
        assert (weights_grouped[name] - w).abs().max() <= 0.01 * learning_rate, name
