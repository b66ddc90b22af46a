"""The frozen vision tower's MLP width zero-padded to a multiple of 128.

Qwen2.5-VL-3B's vision MLP is 3,420 wide: a bf16 row of 6,840 bytes, not 16-byte aligned, on which cuBLAS ran the
tower's gate/up/down GEMMs at 220-240 TFLOP/s on an H100 against ~700 for every other projection. Exact: the
padded gate and up rows have zero weights and biases, and down's padded input columns are zero.
"""
from __future__ import annotations

import logging

log = logging.getLogger("speed")
MULTIPLE = 128


def pad_vision_mlp(model, multiple: int = MULTIPLE) -> int:
    """Pad every vision MLP whose layers are plain frozen nn.Linear ones (not 4-bit, not LoRA-wrapped: their
    adapters keep the model's own shapes). Returns the number of MLPs padded."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP
    if multiple <= 0:
        return 0
    padded = 0
    for mlp in (m for m in model.modules() if isinstance(m, Qwen2_5_VLMLP)):
        layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(x) is not torch.nn.Linear or x.weight.requires_grad for x in layers):
            continue
        width = mlp.gate_proj.out_features
        target = -(-width // multiple) * multiple
        if target == width:
            continue
        mlp.gate_proj, mlp.up_proj = (_grown(x, rows=target) for x in (mlp.gate_proj, mlp.up_proj))
        mlp.down_proj = _grown(mlp.down_proj, cols=target)
        mlp.intermediate_size = target
        padded += 1
    if padded:
        log.info("vision MLP width zero-padded to a multiple of %d in %d blocks", multiple, padded)
    return padded


def _grown(linear, rows: int | None = None, cols: int | None = None):
    """A frozen copy of `linear` with zero output rows / input columns appended."""
    import torch
    w = linear.weight
    out_f, in_f = rows or linear.out_features, cols or linear.in_features
    new = torch.nn.Linear(in_f, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:linear.out_features, :linear.in_features] = w
        if linear.bias is not None:
            new.bias.zero_()
            new.bias[:linear.out_features] = linear.bias
    new.requires_grad_(False)
    return new
