"""Speed levers: every place the pipeline reaches into torch, transformers, peft or accelerate for speed, in one
package, each lever fenced to the library versions it was written and tested for.

A lever names the library code it relies on or replaces (`replaces`; tests/test_speed_fence.py hashes that source
and fails loudly when a library release changes it) and the libraries whose versions fence it. With a version
outside `TESTED`, the lever is off, with one warning, and the library's own path runs. `--speedups-off a,b`
turns levers off by name, for A/B runs (bench/gpu_bench.py).

Stages call `Speedups(backend, off)` once and ask it `on(name)`; the model-level patches are applied by
`apply_for_training` / `apply_for_inference` (common.speed.setup).
"""
from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass

log = logging.getLogger("speed")

# Versions each library's levers were written and tested for: torch by major.minor (2.11 on the GPU machine, 2.13
# the CPU build), the others by major.minor.
TESTED = {"torch": ("2.11", "2.13"), "transformers": ("5.17",), "peft": ("0.21",), "accelerate": ("1.15",)}


@dataclass(frozen=True)
class Lever:
    name: str
    what: str
    backends: tuple[str, ...]
    gpu_only: bool
    libraries: tuple[str, ...]
    replaces: tuple[str, ...] = ()  # "module:Qualified.name" of library code it re-implements or depends on


def _qwen(*names: str) -> tuple[str, ...]:
    return tuple(f"transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:{n}" for n in names)


LEVERS = {lever.name: lever for lever in [
    Lever("bucketed_vision_attention", "the vision tower's windows attended in one SDPA call per window length",
          ("hf", "unsloth"), False, ("transformers",),
          _qwen("Qwen2_5_VLVisionAttention.forward", "Qwen2_5_VisionTransformerPretrainedModel.forward")),
    Lever("vision_mlp_padding", "the frozen vision MLP's width zero-padded to a multiple of 128 (aligned GEMMs)",
          ("hf",), False, ("transformers",), _qwen("Qwen2_5_VLMLP.forward")),
    Lever("host_positions", "position ids and vision indices built by the collator on the host, no GPU read-backs",
          ("hf",), False, ("transformers",),
          _qwen("Qwen2_5_VLModel.get_rope_index", "Qwen2_5_VLModel.get_image_features",
                "Qwen2_5_VLModel.get_placeholder_mask",
                "Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation")
          + ("transformers.vision_utils:get_vision_window_index",)),
    Lever("answer_only_logits", "the LM head and loss only where a token is learned (same loss, far less memory)",
          ("hf",), False, ("transformers",), ("transformers.loss.loss_utils:ForCausalLMLoss",)),
    # not under Unsloth: it compiles its decoder layers and the vision tower's parts itself, and runs the vision
    # attention under torch.compiler.disable, so a region around each vision block breaks at every block (H100:
    # first step 74 s against 18 s, the steps after it no faster)
    Lever("compile", "torch.compile per block (vision; decoder layers in training), floats as constants",
          ("hf",), True, ("torch",)),
    Lever("compile_one_forward", "decoder layers compiled too where inference is one forward (price head, "
          "embeddings)", ("hf",), True, ("torch",)),
    Lever("lora_groups", "q/k/v and gate/up LoRA projections as one grouped GEMM each",
          ("hf",), True, ("transformers", "peft"),
          _qwen("Qwen2_5_VLAttention.forward", "Qwen2MLP.forward") + ("peft.tuners.lora.layer:Linear.forward",)),
    Lever("static_decode", "decoding over a static KV cache, each step one CUDA-graph replay",
          ("hf",), True, ("transformers", "torch"),
          ("transformers.cache_utils:StaticLayer.update",
           "transformers.integrations.sdpa_attention:sdpa_attention_forward")),
    Lever("trainer_glue", "the Trainer's host work trimmed: async pinned copies, no per-step module walk, DDP's "
          "gradients kept in its buckets", ("hf", "unsloth"), False, ("transformers", "accelerate"),
          tuple(f"transformers.trainer:Trainer.{n}" for n in ("_prepare_input", "_prepare_inputs",
                                                               "_build_accelerator_args", "floating_point_ops",
                                                               "_load_optimizer_and_scheduler"))),
    Lever("no_cudnn_attention", "SDPA without cuDNN, which plans anew for every sequence length", ("hf", "unsloth"),
          True, ("torch",)),
]}

# sha256 (first 16 hex digits) of the source of each library function a lever re-implements or depends on, as it
# was when the lever was written and tested (transformers 5.17.0, peft 0.21.2); tests/test_speed_fence.py fails
# when a library release changes one, so the lever is checked again before its fence is widened
SOURCE_SHA256 = {
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLVisionAttention.forward":
        "2afc2f9fa3ebd677",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VisionTransformerPretrainedModel.forward":
        "76f11f57da441812",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLMLP.forward":
        "1e1715d7e10e8420",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel.get_rope_index":
        "690e539be08514b7",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel.get_image_features":
        "b3a60eb600bee01f",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLModel.get_placeholder_mask":
        "ff906bcc350c9b25",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation":
        "44dfcf37a1f97eaa",
    "transformers.vision_utils:get_vision_window_index":
        "e63401aa8d17c007",
    "transformers.loss.loss_utils:ForCausalLMLoss":
        "c7f950f4eb7eba01",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLAttention.forward":
        "e946e2f06ac617c3",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2MLP.forward":
        "03df2d7685cf8446",
    "peft.tuners.lora.layer:Linear.forward":
        "ec0a80f5c5ce05f5",
    "transformers.cache_utils:StaticLayer.update":
        "14d004ef66e52358",
    "transformers.integrations.sdpa_attention:sdpa_attention_forward":
        "2519bd4da7bc7181",
    "transformers.trainer:Trainer._prepare_input":
        "785b906a55d561ae",
    "transformers.trainer:Trainer._prepare_inputs":
        "8f8c4e430d2f96d6",
    "transformers.trainer:Trainer._build_accelerator_args":
        "75b60b903fd84439",
    "transformers.trainer:Trainer._load_optimizer_and_scheduler":
        "bdcb956f06c459ab",
    "transformers.trainer:Trainer.floating_point_ops":
        "ffd8b0eb8cf7c98b",
}

_warned: set[str] = set()


def installed_version(library: str) -> str:
    return importlib.metadata.version(library)


def version_tested(library: str) -> bool:
    """Whether the installed library is a release the levers were tested with; warns once if not."""
    version = installed_version(library)
    ok = any(version == t or version.startswith(t + ".") or version.startswith(t + "+") for t in TESTED[library])
    if not ok and library not in _warned:
        _warned.add(library)
        log.warning("%s %s is not a version the speed levers were tested with (%s): the levers that reach into it "
                    "are off and the library's own code runs", library, version, ", ".join(TESTED[library]))
    return ok


class Speedups:
    """Which levers run in this process: not turned off (`off`), fitting the backend and device, and fenced to
    tested library versions."""

    def __init__(self, backend: str, off: frozenset[str] = frozenset(), cuda: bool | None = None):
        import torch
        unknown = set(off) - set(LEVERS)
        if unknown:
            raise ValueError(f"unknown speed levers {sorted(unknown)}; known: {', '.join(LEVERS)}")
        self.backend, self.off = backend, frozenset(off)
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.enabled = {name: name not in self.off and backend in lever.backends and (self.cuda or not lever.gpu_only)
                        and all([version_tested(library) for library in lever.libraries])
                        for name, lever in LEVERS.items()}

    def on(self, name: str) -> bool:
        return self.enabled[name]

    def active(self) -> list[str]:
        return [name for name, on in self.enabled.items() if on]


def parse_off(text: str) -> frozenset[str]:
    """--speedups-off's value: lever names, comma-separated, or "all" (the libraries' own paths throughout)."""
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    return frozenset(LEVERS) if "all" in names else names


def lever_problems(off: str) -> list[str]:
    """One line if --speedups-off names a lever that does not exist."""
    unknown = parse_off(off) - set(LEVERS)
    return [f"--speedups-off: unknown {', '.join(sorted(unknown))}; known: {', '.join(LEVERS)}"] if unknown else []
