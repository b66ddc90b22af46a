"""LoRA projections that read the same input, run as one: q/k/v in each decoder layer's attention, gate/up in its MLP.

A peft LoRA layer runs three GEMMs forward (frozen base, A, B) and five backward, each reading or writing a tensor
of the input's size. Layers that share an input can share that work: one GEMM for their frozen base weights (kept
as one tensor, each layer's weight becoming a view into it, so no memory is added), one for their stacked A
matrices and one for their B matrices laid block-diagonally. In a Qwen2.5-VL decoder layer that turns the q/k/v and
gate/up projections' 24 + 16 GEMMs a step into 10 + 10 (forward and backward).

The math is peft's own, term for term (`peft.tuners.lora.Linear.forward`): base + B(A(x)) * scaling, with x cast to
the adapter's dtype; a block-diagonal product adds exact zeros. The parameters stay the peft layers' own, so the
optimizer, checkpoints, DDP and the saved adapter see no change. Only plain LoRA qualifies (one adapter, no dropout,
no DoRA or other variant, not merged); any other layer group keeps peft's forward.
"""
from __future__ import annotations

import logging

log = logging.getLogger("model")


def fuse_shared_input_lora(model) -> int:
    """Make every decoder layer of the language model run its q/k/v and its gate/up LoRA projections as one group
    each (see the module's docstring). Returns the number of groups fused."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention, Qwen2_5_VLTextModel, Qwen2MLP
    fused = 0
    for text in (m for m in model.modules() if isinstance(m, Qwen2_5_VLTextModel)):
        for module in list(text.modules()):
            if type(module) is Qwen2_5_VLAttention and _group_ready(module.q_proj, module.k_proj, module.v_proj):
                _stack_base_weights(module, (module.q_proj, module.k_proj, module.v_proj))
                module.__class__ = _fused_classes()[0]
                fused += 1
            elif type(module) is Qwen2MLP and _group_ready(module.gate_proj, module.up_proj):
                _stack_base_weights(module, (module.gate_proj, module.up_proj))
                module.__class__ = _fused_classes()[1]
                fused += 1
    if fused:
        log.info("LoRA: q/k/v and gate/up projections run as one group each (%d groups)", fused)
    return fused


def _group_ready(*layers) -> bool:
    """Whether these are plain peft LoRA layers with the same single adapter and scaling, and no dropout."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    if not all(type(layer) is LoraLinear for layer in layers):
        return False
    adapters = {tuple(layer.active_adapters) for layer in layers}
    if len(adapters) != 1 or len(next(iter(adapters))) != 1:
        return False
    name = next(iter(adapters))[0]
    return (all(not layer.merged and not layer.disable_adapters and name in layer.lora_A
                and name not in layer.lora_variant and isinstance(layer.lora_dropout[name], torch.nn.Identity)
                and layer.lora_B[name].bias is None for layer in layers)
            and len({layer.scaling[name] for layer in layers}) == 1)


def _stack_base_weights(module, layers) -> None:
    """Put the layers' frozen base weights (and biases) into one tensor on `module`, each layer's weight a view of
    it. Not possible (4-bit, trainable, mixed dtypes or biases): the group keeps one base GEMM per layer."""
    import torch
    bases = [layer.base_layer for layer in layers]
    module.register_parameter("stacked_base_weight", None)
    module.register_parameter("stacked_base_bias", None)
    has_bias = {b.bias is not None for b in bases}
    if (any(type(b) is not torch.nn.Linear or b.weight.requires_grad for b in bases) or len(has_bias) != 1
            or len({(b.weight.dtype, b.weight.device) for b in bases}) != 1):
        return
    for name in ("weight", "bias") if has_bias == {True} else ("weight",):
        stacked = torch.cat([getattr(b, name).detach() for b in bases])
        # a frozen parameter, not a buffer: DDP, if asked to broadcast buffers, would send these every step
        module.register_parameter(f"stacked_base_{name}", torch.nn.Parameter(stacked, requires_grad=False))
    _view_stacked(module, layers)


def _view_stacked(module, layers) -> None:
    """Make each layer's base weight and bias a view of the module's stacked tensors again."""
    import torch
    for name in ("weight", "bias"):
        stacked = getattr(module, f"stacked_base_{name}")
        if stacked is None:
            continue
        start = 0
        for layer in layers:
            rows = getattr(layer.base_layer, name).shape[0]
            setattr(layer.base_layer, name, torch.nn.Parameter(stacked.data[start:start + rows], requires_grad=False))
            start += rows


def shared_input_lora(module, x, layers):
    """The outputs of the peft LoRA layers `layers` on the same input x, as peft computes them."""
    import torch
    import torch.nn.functional as F
    name = layers[0].active_adapters[0]
    if module.stacked_base_weight is not None:
        base = F.linear(x, module.stacked_base_weight, module.stacked_base_bias)
        bases = base.split([layer.out_features for layer in layers], dim=-1)
    else:
        bases = [layer.base_layer(x) for layer in layers]
    a_weights = [layer.lora_A[name].weight for layer in layers]
    b_weights = [layer.lora_B[name].weight for layer in layers]
    ranks = [w.shape[0] for w in a_weights]
    # B of layer i occupies its own rows and its own rank's columns; the zeros elsewhere add nothing
    block = torch.cat([F.pad(w, (sum(ranks[:i]), sum(ranks[i + 1:]))) for i, w in enumerate(b_weights)])
    a = F.linear(layers[0]._cast_input_dtype(x, a_weights[0].dtype), torch.cat(a_weights))
    deltas = (F.linear(a, block) * layers[0].scaling[name]).split([w.shape[0] for w in b_weights], dim=-1)
    return [(out + delta).to(out.dtype) for out, delta in zip(bases, deltas)]


_CLASSES: tuple = ()


def _fused_classes():
    """(attention, MLP) subclasses of the library's whose forward runs the grouped projections; built on first use
    so that importing this module does not import transformers."""
    global _CLASSES
    if _CLASSES:
        return _CLASSES
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    class StackedBases:
        GROUP: tuple = ()

        def _apply(self, fn, recurse=True):
            # .to() / .cuda() / .half() move the stacked tensor and each layer's view on their own, into separate
            # copies (the 3B's language model would hold 3.4 GiB of its weights twice); view the moved stack again
            super()._apply(fn, recurse)
            _view_stacked(self, [getattr(self, name) for name in self.GROUP])
            return self

    class GroupedLoraAttention(StackedBases, qwen.Qwen2_5_VLAttention):
        """The library's attention forward (transformers 5.17), with q/k/v from one shared-input LoRA group."""
        GROUP = ("q_proj", "k_proj", "v_proj")

        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    position_embeddings=None, **kwargs):
            bsz, q_len, _ = hidden_states.size()
            q, k, v = (t.view(bsz, q_len, -1, self.head_dim).transpose(1, 2) for t in
                       shared_input_lora(self, hidden_states, (self.q_proj, self.k_proj, self.v_proj)))
            cos, sin = position_embeddings
            q, k = qwen.apply_rotary_pos_emb(q, k, cos, sin)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            attention = qwen.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                   qwen.eager_attention_forward)
            out, weights = attention(self, q, k, v, attention_mask,
                                     dropout=0.0 if not self.training else self.attention_dropout,
                                     scaling=self.scaling, sliding_window=self.sliding_window,
                                     position_ids=position_ids, **kwargs)
            return self.o_proj(out.reshape(bsz, q_len, -1).contiguous()), weights

    class GroupedLoraMLP(StackedBases, qwen.Qwen2MLP):
        """The library's SwiGLU MLP, with gate/up from one shared-input LoRA group."""
        GROUP = ("gate_proj", "up_proj")

        def forward(self, x):
            gate, up = shared_input_lora(self, x, (self.gate_proj, self.up_proj))
            return self.down_proj(self.act_fn(gate) * up)

    _CLASSES = (GroupedLoraAttention, GroupedLoraMLP)
    return _CLASSES
