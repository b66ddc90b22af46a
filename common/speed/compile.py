"""torch.compile per block, and the process-wide torch settings that go with it.

Each vision block and (in training; with `compile_one_forward`, in inference that is one forward: the price head,
embeddings) each decoder layer is compiled as its own region with dynamic shapes, so norms, rotary embeddings,
SwiGLU and the LoRA adds fuse; one compilation per block type serves every layer. Generation keeps its decoder
layers eager: their KV cache updates would break the graphs, and static decoding replays its own CUDA graphs.
The model's float attributes (norm eps, attention and LoRA scaling) are compiled as constants (`specialize_float`):
passed as 0-d CPU tensors instead, each costs a read-back and a C++ kernel per block, and the 3B's first step
compiles 2-3x slower. Under DDP each block stays one graph (`optimize_ddp` off): a block's gradients reach DDP's
reducer as its backward ends anyway, so a cut buys no overlap and splits the fusions. hf backend only: Unsloth
compiles its decoder layers and the vision tower's parts itself (common.speed, "compile").
"""
from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

log = logging.getLogger("speed")


def compile_blocks(model, decoder_layers: bool) -> int:
    """Compile the vision blocks, and with `decoder_layers` the decoder layers. Returns how many."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock
    kinds = (Qwen2_5_VLVisionBlock, Qwen2_5_VLDecoderLayer) if decoder_layers else (Qwen2_5_VLVisionBlock,)
    blocks = [m for m in model.modules() if isinstance(m, kinds)]
    if not blocks:
        return 0
    torch._dynamo.config.specialize_float = True
    torch._dynamo.config.optimize_ddp = False
    for block in blocks:
        block.compile(dynamic=True)
    log.info("torch.compile: %d blocks; the first steps include compiling", len(blocks))
    return len(blocks)


class KeepThreadCount(TrainerCallback):
    """Gives the process its torch thread count back at each step. A DataLoader's pin-memory thread sets the count
    to 1 when the loader starts (each epoch), and autograd's GPU thread, started by the first backward, takes that
    count: a decoder layer that gradient checkpointing recomputes there then fails dynamo's thread-count guard and
    compiles again (seen on an H100: every variant of the layer compiled twice)."""

    def __init__(self):
        self.threads = torch.get_num_threads()

    def on_step_begin(self, args, state, control, **kwargs):
        torch.set_num_threads(self.threads)  # unconditionally: this thread may read its own count, not the process's


def no_cudnn_attention() -> None:
    """SDPA may not pick cuDNN, its first choice on an H100: cuDNN builds an execution plan for every new sequence
    length, and with real catalog lengths every batch (and every decode step) is one; profiled, those builds held
    the GPU idle for half of inference. SDPA takes the flash or memory-efficient kernel instead."""
    torch.backends.cuda.enable_cudnn_sdp(False)
