"""LoRA projections that read the same input, run as one: q/k/v in each decoder layer's attention, gate/up in its MLP.

A peft LoRA layer runs three GEMMs forward (frozen base, A, B) and five backward, each reading or writing a tensor
of the input's size. Layers that share an input can share that work: one GEMM for their frozen base weights (kept
as one tensor, each layer's weight becoming a view into it, so no memory is added), one for their stacked A
matrices and one for their B matrices laid block-diagonally. In a Qwen2.5-VL decoder layer that turns the q/k/v and
gate/up projections' 24 + 16 GEMMs a step into 10 + 10 (forward and backward).

The math is peft's own, term for term (`peft.tuners.lora.Linear.forward`): base + B(A(x)) * scaling, with x cast to
the adapter's dtype; a block-diagonal product adds exact zeros. The parameters stay the peft layers' own, so the
optimizer, checkpoints, DDP and the saved adapter see no change. Only plain LoRA qualifies (one adapter, no dropout,
no DoRA or other variant, not merged, no hooks on the layers); any other layer group keeps peft's forward, and so
does a group whose adapter is disabled, merged, unloaded or switched after grouping (checked at every forward,
which under torch.compile is a guard). Costs: `model.state_dict()` also holds each stack (2 keys per group); peft's
merge_and_unload leaves the unloaded layers' weights views of the stacks, which safetensors refuses to save as
they are (clone them first); DDP's start broadcasts the stacked weights besides their views, once.
"""
from __future__ import annotations

import logging

log = logging.getLogger("model")


def fuse_shared_input_lora(model) -> int:
    """Make every decoder layer of the language model run its q/k/v and its gate/up LoRA projections as one group
    each (see the module's docstring). Returns the number of groups fused."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention, Qwen2_5_VLTextModel, Qwen2MLP
    attention_class, mlp_class = _fused_classes()
    fused, left = 0, set()
    for text in (m for m in model.modules() if isinstance(m, Qwen2_5_VLTextModel)):
        for module in list(text.modules()):
            if type(module) is Qwen2_5_VLAttention:
                grouped = attention_class
            elif type(module) is Qwen2MLP:
                grouped = mlp_class
            else:
                continue
            layers = [getattr(module, name) for name in grouped.GROUP]
            why = _not_groupable(layers)
            if why:
                left.add(why)
                continue
            _stack_base_weights(module, layers)
            module.__class__ = grouped
            fused += 1
    if fused:
        log.info("LoRA: q/k/v and gate/up projections run as one group each (%d groups)", fused)
    if left:
        log.warning("LoRA groups: some projections left to peft's layers one by one: %s", "; ".join(sorted(left)))
    return fused


def _not_groupable(layers) -> str:
    """Why these layers cannot run as one group now ("" if they can): each must be a plain peft LoRA layer, not
    merged or disabled, with the same single active adapter and adapter dtype, and no dropout, variant
    (DoRA, ...), B bias or hooks (a grouped forward calls no layer, so a hook on one would not run)."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    if not all(type(layer) is LoraLinear for layer in layers):
        return "not all plain peft LoRA layers"
    adapters = {tuple(layer.active_adapters) for layer in layers}
    if len(adapters) != 1 or len(next(iter(adapters))) != 1:
        return "not one single active adapter"
    name = next(iter(adapters))[0]
    if any(layer.merged or layer.disable_adapters or name not in layer.lora_A for layer in layers):
        return "adapter merged or disabled"
    if any(name in layer.lora_variant or layer.lora_B[name].bias is not None for layer in layers):
        return "a LoRA variant (DoRA, ...) or a B bias"
    if not all(isinstance(layer.lora_dropout[name], torch.nn.Identity) for layer in layers):
        return "LoRA dropout (each layer draws its own mask)"
    if len({(layer.lora_A[name].weight.dtype, getattr(layer, "cast_input_dtype_enabled", True))
            for layer in layers}) != 1:
        return "different adapter dtypes"
    if any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers):
        return "hooks on a layer"
    return ""


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


def _views_stack(module, layers) -> bool:
    """Whether every layer's base weight is still a view of the module's stack (peft's merge_and_unload or a safe
    merge replaces them)."""
    stacked = module.stacked_base_weight
    return stacked is not None and all(
        hasattr(layer, "base_layer") and layer.base_layer.weight.untyped_storage().data_ptr() ==
        stacked.untyped_storage().data_ptr() for layer in layers)


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
    deltas = F.linear(a, block).split([w.shape[0] for w in b_weights], dim=-1)
    return [(out + delta * layer.scaling[name]).to(out.dtype) for out, delta, layer in zip(bases, deltas, layers)]


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

        def group(self) -> list | None:
            """The grouped layers, or None where they no longer qualify (an adapter disabled, merged, unloaded or
            switched after grouping): then the library's forward runs them one by one, as peft would."""
            layers = [getattr(self, name) for name in self.GROUP]
            return None if _not_groupable(layers) else layers

        def _apply(self, fn, recurse=True):
            # .to() / .cuda() / .half() move the stacked tensor and each layer's view on their own, into separate
            # copies (the 3B's language model would hold 3.4 GiB of its weights twice); view the moved stack again
            layers = [getattr(self, name) for name in self.GROUP]
            viewed = _views_stack(self, layers)
            super()._apply(fn, recurse)
            if viewed:
                _view_stacked(self, layers)
            return self

    class GroupedLoraAttention(StackedBases, qwen.Qwen2_5_VLAttention):
        """The library's attention forward (transformers 5.17), with q/k/v from one shared-input LoRA group."""
        GROUP = ("q_proj", "k_proj", "v_proj")

        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    position_embeddings=None, **kwargs):
            layers = self.group()
            if layers is None:
                return super().forward(hidden_states, attention_mask, position_ids, past_key_values,
                                       position_embeddings, **kwargs)
            bsz, q_len, _ = hidden_states.size()
            q, k, v = (t.view(bsz, q_len, -1, self.head_dim).transpose(1, 2) for t in
                       shared_input_lora(self, hidden_states, layers))
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
            layers = self.group()
            if layers is None:
                return super().forward(x)
            gate, up = shared_input_lora(self, x, layers)
            return self.down_proj(self.act_fn(gate) * up)

    _CLASSES = (GroupedLoraAttention, GroupedLoraMLP)
    return _CLASSES
