"""Model, tokenizer and LoRA loading: Unsloth on a GPU, transformers + peft elsewhere.

`--model` is `tiny` (built offline under WORK_DIR/models/tiny), a local folder, or a hub id.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from common import layout
from common.data.encode import load_tokenizer
from common.errors import PipelineError

log = logging.getLogger("model")
# LoRA on the language model's seven projections only: names like `gate_proj` also match the vision
# tower's MLP, which stays frozen unless asked for.
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*visual.*\.(qkv|proj|gate_proj|up_proj|down_proj)"


class ModelNotFound(PipelineError, ValueError):
    pass


class MissingPackage(PipelineError, ImportError):
    pass


def require(package: str, needed_for: str, instead: str) -> None:
    """One line naming a missing optional package, what needs it and how to do without it."""
    if importlib.util.find_spec(package) is None:
        raise MissingPackage(f"{needed_for} needs the {package} package, which is not installed: {instead}")


def require_cuda(needed_for: str, instead: str) -> None:
    import torch
    if not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "a CUDA torch that sees no GPU"
        raise MissingPackage(f"{needed_for} needs a CUDA GPU; this machine has {build}: {instead}")


def _looks_like_path(name: str) -> bool:
    path = Path(name).expanduser()
    return name.startswith(("/", ".", "~")) or path.exists() or Path(path.parts[0]).exists()


def resolve_model(name: str, work_dir: Path) -> str:
    """`tiny` (built under WORK_DIR/models), a local folder with a config.json, or a hub id reachable now (in the
    local cache, or online). Anything else is one clear line."""
    if name == "tiny":
        from common.demo.tiny import ensure_tiny_model
        return str(ensure_tiny_model(layout.models_dir(work_dir) / "tiny"))
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model folder {name} not found (or has no config.json)")
        return str(path.resolve())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)
    try:
        hf_hub_download(name, "config.json")
    except HFValidationError:
        raise ModelNotFound(f"--model {name}: no such local folder, and not a hub id (owner/name)") from None
    except (GatedRepoError, RepositoryNotFoundError):
        raise ModelNotFound(f"model {name} not found on the Hugging Face hub (or gated: log in first)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as err:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise ModelNotFound(f"model {name} is not in the local Hugging Face cache and the hub cannot be reached"
                            f"{offline}: {type(err).__name__}; download it where there is a network, or pass "
                            "a local folder") from None
    return name


def check_model_files(path: str) -> None:
    """Load the tokenizer and image settings once, so that a broken model folder is one line in the parent
    process, not a failure in every worker."""
    from common.data.encode import ImageSpec
    try:
        load_tokenizer(path)
        ImageSpec.from_model(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelNotFound(f"model {path}: cannot load its tokenizer or image-processor settings: "
                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def compile_blocks(model, which: str, backend: str, cuda_graphs: bool = False, float_constants: bool = False) -> int:
    """torch.compile every vision block and/or language-model decoder layer as its own region (dynamic shapes),
    so norms, rotary, SwiGLU and the LoRA adds fuse; one compile per block type, reused by every layer.
    which: none | vision | vision+mlp | all | auto (all on CUDA with the hf backend; vision with Unsloth, which
    compiles its decoder layers itself; none on CPU, where compiling costs more than the demo's whole run).
    vision+mlp (inference): the vision blocks, and in the language model only the MLPs and RMSNorms, the parts that
    never touch the KV cache (a compiled decoder layer guards on its own cache slot: one recompile per layer).
    float_constants (hf backend): the model's float attributes (RMSNorm eps, attention and LoRA scaling) compiled
    as constants (`torch._dynamo.config.specialize_float`, process-wide). With dynamic shapes Dynamo otherwise
    passes each as a 0-d CPU tensor read with .item(), 10 per decoder layer and 3 per vision block, and Inductor
    builds C++ CPU kernels for them: the 3B's first training step compiled in 32-39 s with constants against
    90-130 s without, on H100s (bench/RESULTS.md). They are fixed per model, so nothing recompiles.
    cuda_graphs (experimental; implies float_constants, as a CUDA graph cannot hold CPU scalar inputs): mode
    "reduce-overhead", each block's kernels recorded once per shape and replayed (a step of ~5,400 small launches
    is host-bound on some H100 hosts), with PyTorch's checks at recording made cheaper (common/graph_trees.py);
    the caller marks each step's begin (`torch.compiler.cudagraph_mark_step_begin`). On a CPU nothing is graphed.
    Returns the number of modules compiled."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLDecoderLayer, Qwen2_5_VLRMSNorm,
                                                                    Qwen2_5_VLTextModel, Qwen2_5_VLVisionBlock,
                                                                    Qwen2MLP)
    if which == "auto":
        which = "none" if not torch.cuda.is_available() else ("vision" if backend == "unsloth" else "all")
    blocks = []
    if which in ("vision", "vision+mlp", "all"):
        blocks += [m for m in model.modules() if isinstance(m, Qwen2_5_VLVisionBlock)]
    if which == "all":
        blocks += [m for m in model.modules() if isinstance(m, Qwen2_5_VLDecoderLayer)]
    if which == "vision+mlp":
        blocks += [m for text in model.modules() if isinstance(text, Qwen2_5_VLTextModel)
                   for m in text.modules() if isinstance(m, (Qwen2MLP, Qwen2_5_VLRMSNorm))]
    graphed = "reduce-overhead" if cuda_graphs else None
    if blocks and cuda_graphs:
        from common.speed.graph_trees import speed_up_graph_recording
        speed_up_graph_recording()
    if blocks and (cuda_graphs or (float_constants and backend == "hf")):
        torch._dynamo.config.specialize_float = True
    for block in blocks:
        block.compile(dynamic=True, mode=graphed)
    if blocks:
        log.info("torch.compile: %d modules (%s%s%s); the first steps include compiling", len(blocks), which,
                 ", float constants" if torch._dynamo.config.specialize_float else "",
                 ", CUDA graphs" if cuda_graphs else "")
    return len(blocks)


def pad_vision_mlp(model, multiple: int) -> int:
    """Zero-pad the vision tower's MLP width up to a multiple of `multiple`. Qwen2.5-VL-3B's is 3,420: a bf16 row
    of 6,840 bytes, not 16-byte aligned, on which cuBLAS runs the tower's gate/up/down GEMMs at 220-240 TFLOP/s
    on an H100 against ~700 for every other projection of the model (bench/gpu_prefill_floor.py). Compiled
    blocks mostly recover that by themselves (Inductor pads such matmuls, with copies): measured, inference
    +1.9% with the same predictions, training neutral (bench/RESULTS.md). Exact: the padded gate and up rows
    have zero weights and biases, and down's padded input columns are zero, so they add nothing. Only plain
    frozen nn.Linear layers are padded (not 4-bit ones, not LoRA-wrapped ones: their adapters keep the model's
    own shapes). Returns the number of MLPs padded."""
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


def split_compiled_graphs_for_ddp(enabled: bool) -> None:
    """Whether torch.compile cuts each compiled region at DDP's gradient-bucket edges (dynamo's DDPOptimizer,
    PyTorch's default), so that a large region can start all-reducing before its backward ends. Our regions are
    single blocks, whose gradients reach DDP's reducer as each block's backward ends anyway; a cut buys no overlap
    and splits the block's fusions: a 3B decoder layer holds 3.3 MB of fp32 LoRA weights, over DDP's 1 MB first
    bucket, so every layer compiled as two graphs under torchrun: 18 ms a step and 9 GiB more on two H200s
    (bench/gpu_runs/h200x2-y.json)."""
    import torch
    torch._dynamo.config.optimize_ddp = enabled


def compiled_graphs_split_for_ddp() -> bool:
    import torch
    return bool(torch._dynamo.config.optimize_ddp)


def skip_image_readbacks(model) -> None:
    """Let the model's forward merge image features without two GPU -> host read-backs per forward: the split of
    the vision tower's output per image (`.tolist()` of the grids), undone by the forward's next line, and the
    image-token count check (formatted into its message before the check runs). The collator checks the same
    count on the host (`common.model.collate.check_image_tokens`); use only with batches from a host-ids collator."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.utils.generic import accepts_precomputed_kwargs
    inner = next(m for m in model.modules() if isinstance(m, Qwen2_5_VLModel))
    checked_placeholder_mask = inner.get_placeholder_mask
    image_token_id, video_token_id = inner.config.image_token_id, inner.config.video_token_id

    # the decorator the library's own get_image_features carries: the collator's `image_position_ids`,
    # `image_cu_seqlens`, ... reach the tower as `position_ids`, ...; passed on unrenamed, the tower ignored them and
    # rebuilt each on the GPU, reading the grids back every step
    @accepts_precomputed_kwargs(modality="image")
    def image_features(pixel_values, image_grid_thw=None, **kwargs):
        out = inner.visual(pixel_values.type(inner.visual.dtype), grid_thw=image_grid_thw, **kwargs)
        out.pooler_output = (out.pooler_output,)
        return out

    def placeholder_mask(input_ids, inputs_embeds, image_features=None, video_features=None):
        if input_ids is None:
            return checked_placeholder_mask(input_ids, inputs_embeds, image_features, video_features)
        return (input_ids == image_token_id).unsqueeze(-1), (input_ids == video_token_id).unsqueeze(-1)

    inner.get_image_features = image_features
    inner.get_placeholder_mask = placeholder_mask


def use_cudnn_attention(enabled: bool) -> None:
    """Whether PyTorch's scaled_dot_product_attention may pick cuDNN's kernel, its first choice on an H100.
    cuDNN builds an execution plan for every new sequence length; with real catalog lengths every batch is a
    new length, and so is every decode step's longer cache. Profiled on an H100 (bench/gpu_runs/h100-f.json):
    those builds held the GPU idle for 2.1 s of 4.6 s of inference and 2.3 s of 3.3 s of two training steps.
    Off, SDPA takes the flash or memory-efficient kernel, which need no plan."""
    import torch
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def make_decoder(model, decode: str, backend: str):
    """None (decode with generate()) or a `common.speed.decode.StaticDecoder`. auto: CUDA graphs on a GPU with the
    transformers backend (Unsloth's generate is its own); generate elsewhere, where launches cost little."""
    import torch
    if decode == "auto":
        decode = "graphs" if torch.cuda.is_available() and backend == "hf" else "generate"
    if decode == "generate":
        return None
    if backend != "hf":
        raise ValueError(f"--decode {decode} runs the transformers model; backend {backend} decodes with generate")
    from common.speed.decode import StaticDecoder
    return StaticDecoder(model, graphs=decode == "graphs")


def bind_local_gpu() -> None:
    """Under torchrun, make this rank's GPU (LOCAL_RANK) the current one, so that `.to("cuda")` and NCCL
    use it rather than every rank piling onto GPU 0."""
    import os

    import torch
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def pick_backend(requested: str) -> str:
    import torch
    if requested == "unsloth":
        require_cuda("--backend unsloth", "use --backend hf (transformers + peft)")
        require("unsloth", "--backend unsloth", "pip install -r requirements-gpu.txt on a CUDA machine, or use "
                "--backend hf")
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
        return "unsloth"
    return "hf"


def import_backend(requested: str) -> str:
    """pick_backend, and for Unsloth its import, which must come before transformers, peft and trl are
    imported: it patches them on import (imported later, it warns that training may be slower or use more
    memory). Stages 6 and 7 call this before anything that imports transformers."""
    backend = pick_backend(requested)
    if backend == "unsloth":
        import unsloth  # noqa: F401
    return backend


def _log_trainable(model, backend: str) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    vision = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A") and ".visual." in n)
    log.info("%s: LoRA on %d modules (%d in the vision tower), %.1f M trainable parameters", backend, lora,
             vision, trainable / 1e6)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    tune_vision: bool = False


def load_for_training(path: str, backend: str, lora: LoraSettings, load_in_4bit: bool,
                      gradient_checkpointing: bool, seed: int):
    """(model with LoRA adapters, backend actually used)."""
    import torch
    backend = pick_backend(backend)
    if backend == "unsloth":
        from unsloth import FastVisionModel
        # Unsloth defaults to its offloaded checkpointing in from_pretrained, get_peft_model and for_training
        # alike (for_training(None) takes get_peft_model's choice): the option must reach all three, or
        # --no-gradient-checkpointing is silently ignored (FINDINGS, H100: 8.5 samples/s with that mode,
        # 14.2 without, at batch 16).
        checkpointing = "unsloth" if gradient_checkpointing else False
        model, _ = FastVisionModel.from_pretrained(
            path, load_in_4bit=load_in_4bit, dtype=torch.bfloat16, use_gradient_checkpointing=checkpointing)
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=lora.tune_vision, finetune_language_layers=True,
            finetune_attention_modules=True, finetune_mlp_modules=True, r=lora.r, lora_alpha=lora.alpha,
            lora_dropout=lora.dropout, bias="none", random_state=seed, use_gradient_checkpointing=checkpointing)
        FastVisionModel.for_training(model, use_gradient_checkpointing=checkpointing)
        _log_trainable(model, backend)
        return model, backend
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration
    cuda = torch.cuda.is_available()
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if load_in_4bit and cuda:
        require("bitsandbytes", "a 4-bit base (--load-in-4bit)", "pip install -r requirements-gpu.txt, or pass "
                "--no-load-in-4bit")
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs)
    if load_in_4bit and cuda:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    targets = LANGUAGE_TARGETS + (f"|{VISION_TARGETS}" if lora.tune_vision else "")
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not lora.tune_vision:
            # transformers marks the inputs as requiring grad, which makes the frozen vision tower
            # recompute and back-propagate (3x slower on an H100, see FINDINGS); LoRA does not need it.
            model.base_model.model.disable_input_require_grads()
    _log_trainable(model, backend)
    return model, backend


def load_for_inference(base_path: str, adapter: str | None, backend: str):
    """Base model (+ LoRA adapter merged where possible), in eval mode."""
    import torch
    backend = pick_backend(backend)
    if backend == "unsloth":
        from unsloth import FastVisionModel
        model, _ = FastVisionModel.from_pretrained(adapter or base_path, load_in_4bit=True, dtype=torch.bfloat16,
                                                   use_gradient_checkpointing=False)
        FastVisionModel.for_inference(model)
        return model, backend
    from transformers import Qwen2_5_VLForConditionalGeneration
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_path, dtype=dtype)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    model.requires_grad_(False)  # inference keeps no gradients; frozen weights may also be re-laid (pad_vision_mlp)
    return model, backend
