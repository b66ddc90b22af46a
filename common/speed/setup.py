"""The one call each stage makes to apply the speed levers that are on (common.speed.Speedups) to its model."""
from __future__ import annotations

import logging

from common.speed import Speedups

log = logging.getLogger("speed")


def _model_levers(model, speed: Speedups, training: bool, one_forward: bool = False):
    from common.speed.compile import compile_blocks, no_cudnn_attention
    from common.speed.positions import HostLayout, skip_image_readbacks
    from common.speed.vision_attention import use_bucketed_vision_attention
    from common.speed.vision_mlp import pad_vision_mlp
    if speed.on("bucketed_vision_attention"):
        use_bucketed_vision_attention(model)
    if speed.on("vision_mlp_padding"):
        pad_vision_mlp(model)  # before compiling: the blocks compile with its shapes
    if training and speed.on("lora_groups"):
        from common.speed.lora_groups import fuse_shared_input_lora
        fuse_shared_input_lora(model)
    if speed.on("compile"):
        compile_blocks(model, training or (one_forward and speed.on("compile_one_forward")))
    if speed.on("no_cudnn_attention"):
        no_cudnn_attention()
    host = HostLayout.from_model(model) if speed.on("host_positions") else None
    if host is not None:
        skip_image_readbacks(model)  # the host-ids collator checks each sample's image tokens instead
    return host


def apply_for_training(model, speed: Speedups):
    """Apply the model-level levers; the `HostLayout` the collator needs for host-built ids, or None."""
    host = _model_levers(model, speed, training=True)
    log.info("speed levers on: %s", ", ".join(speed.active()) or "none")
    return host


def apply_for_inference(model, speed: Speedups, decoding: bool = True):
    """(HostLayout or None, a static decoder or None for the library's generate())."""
    host = _model_levers(model, speed, training=False, one_forward=not decoding)
    decoder = None
    if decoding and speed.on("static_decode") and host is not None:
        from common.speed.decode import StaticDecoder
        decoder = StaticDecoder(model, graphs=True)
    log.info("speed levers on: %s", ", ".join(speed.active()) or "none")
    return host, decoder
