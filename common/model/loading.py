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


class NotAnAdapter(PipelineError, ValueError):
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
        # absolute: train_config.json keeps this path, and stage 7 may run from another directory
        return str(ensure_tiny_model(layout.models_dir(work_dir) / "tiny").resolve())
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


def training_model(name: str, work_dir: Path, stage4_samples: bool) -> str:
    """Stage 6's base model, resolved: --model, or (empty) the one 4_preprocess.py encoded the train split with.
    Training on stage 4's samples (`stage4_samples`), another model is refused: their tokens and image grids are
    its."""
    from common.data.preprocess import model_identity
    from common.fsio import read_json
    folder = layout.preprocessed_dir(work_dir, "train")
    stats, params = folder / "stats.json", folder / "params.json"
    # as stage 4 was given it: `tiny` is this work folder's own, wherever the folder moved
    given = read_json(stats)["options"]["model"] if stats.exists() else None
    if not name and given is None:
        raise ModelNotFound(f"--model not given and {stats} (4_preprocess.py's record of its model) not found: "
                            "pass --model")
    name = name or given
    path = resolve_model(name, work_dir)
    if stage4_samples and params.exists():
        encoded, mine = read_json(params)["model"], model_identity(path)
        if mine != encoded and mine.startswith("sha256:") == encoded.startswith("sha256:"):
            raise ModelNotFound(f"--model {name} is not the model 4_preprocess.py encoded {folder} with "
                                f"({given or encoded}): leave --model out to train that one, or rerun "
                                f"4_preprocess.py and 5_convert.py with --model {name} --force")
    return path


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


def gpu_memory_text() -> str:
    import torch
    if not torch.cuda.is_available():
        return "no GPU"
    return f"{torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30:.0f} GiB of GPU memory"


def bind_local_gpu() -> None:
    """Under torchrun, make this rank's GPU (LOCAL_RANK) the current one, so that `.to("cuda")` and NCCL
    use it rather than every rank piling onto GPU 0."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def pick_backend(requested: str) -> str:
    import torch
    if requested == "unsloth":
        require_cuda("--backend unsloth", "use --backend hf (transformers + peft)")
        require("unsloth", "--backend unsloth", "pip install -r requirements-gpu.txt on a CUDA machine, or use "
                "--backend hf")
    # auto: transformers + peft with the speed levers, measured several times faster than Unsloth on the 3B at
    # every memory budget (docs/performance.md); Unsloth runs when asked for
    return "hf" if requested == "auto" else requested


def backend_problem(requested: str) -> list[str]:
    """Why the requested backend cannot run here (for the options check), or nothing; Unsloth, when it can run, is
    imported."""
    try:
        import_backend(requested)
    except PipelineError as err:
        return [str(err)]
    return []


def import_unsloth_if_asked(argv: list[str]) -> None:
    """With --backend unsloth in argv, import Unsloth before anything imports transformers, the options parser
    included (it patches transformers, peft and trl as it is imported); where it cannot run, the options check
    reports why."""
    if "--backend=unsloth" in argv or any(a == "--backend" and b == "unsloth" for a, b in zip(argv, argv[1:])):
        backend_problem("unsloth")


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


def torch_dtype(name: str):
    import torch
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_for_training(path: str, plan, lora: LoraSettings, seed: int):
    """The model with LoRA adapters as the plan (common.model.plan) lays it out: backend, base precision, dtype
    and the decoder layers that recompute their activations."""
    dtype = torch_dtype(plan.dtype)
    four_bit = plan.base_precision == "4bit"
    if plan.backend == "unsloth":
        from unsloth import FastVisionModel
        # Unsloth defaults to its offloaded checkpointing in from_pretrained, get_peft_model and for_training
        # alike (for_training(None) takes get_peft_model's choice): the choice must reach all three, or "off" is
        # silently ignored (H100: 8.5 samples/s with that mode, 14.2 without, at batch 16)
        checkpointing = "unsloth" if plan.checkpoint_every else False
        model, _ = FastVisionModel.from_pretrained(path, load_in_4bit=four_bit, dtype=dtype,
                                                   use_gradient_checkpointing=checkpointing)
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=lora.tune_vision, finetune_language_layers=True,
            finetune_attention_modules=True, finetune_mlp_modules=True, r=lora.r, lora_alpha=lora.alpha,
            lora_dropout=lora.dropout, bias="none", random_state=seed, use_gradient_checkpointing=checkpointing)
        FastVisionModel.for_training(model, use_gradient_checkpointing=checkpointing)
        _log_trainable(model, plan.backend)
        return model
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration
    kwargs = {"dtype": dtype}
    if four_bit:
        require("bitsandbytes", "a 4-bit base (--base-precision 4bit)", "pip install -r requirements-gpu.txt, or "
                "pass --base-precision 16bit")
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs)
    if four_bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = LANGUAGE_TARGETS + (f"|{VISION_TARGETS}" if lora.tune_vision else "")
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    if plan.checkpoint_every or plan.recompute_limits:  # with limits, common.model.recompute sets the layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                            every_n_layers=plan.checkpoint_every or 1)
        if not lora.tune_vision:
            # transformers marks the inputs as requiring grad, which makes the frozen vision tower
            # recompute and back-propagate (3x slower on an H100); LoRA does not need it
            model.base_model.model.disable_input_require_grads()
    _log_trainable(model, plan.backend)
    return model


def adapter_problem(adapter: str) -> str | None:
    """A LoRA adapter is a folder with an adapter_config.json; anything else (a data folder, a base model) is one
    line, not a tokenizer or peft error later."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        return (f"--adapter {adapter} is not a LoRA adapter (no adapter_config.json there): pass the folder "
                "6_train.py wrote (WORK_DIR/train), or --adapter none")
    return None


def adapter_base(adapter: str) -> tuple[str, str]:
    """(the base model the adapter was trained on, the file that says so): stage 6's train_config.json, else
    peft's adapter_config.json."""
    for name, key in (("train_config.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            base = json.loads((Path(adapter) / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if base:
            return str(base), f"its {name}"
    return "unknown", "neither its train_config.json nor its adapter_config.json names it"


def load_adapter(model, adapter: str, base_path: str):
    """The base with the adapter merged in; an adapter of another base (its LoRA shapes or modules do not fit) is one
    line naming the base it was trained on."""
    from peft import PeftModel
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (RuntimeError, ValueError) as err:
        if not any(s in str(err) for s in ("size mismatch", "Target module", "not found in the base model")):
            raise
        trained_on, source = adapter_base(adapter)
        raise NotAnAdapter(f"adapter {adapter} was trained on base {trained_on} (from {source}), not "
                           f"{base_path}: pass --model {trained_on}") from None


def load_for_inference(base_path: str, adapter: str | None, backend: str, dtype: str = "auto"):
    """Base model (+ LoRA adapter merged where possible), in eval mode. dtype auto: bf16 on a GPU that has it,
    else fp16; fp32 on a CPU."""
    import torch
    backend = pick_backend(backend)
    if adapter and adapter_problem(adapter):
        raise NotAnAdapter(adapter_problem(adapter))
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if torch.cuda.is_available() \
            else "float32"
    if backend == "unsloth":
        from unsloth import FastVisionModel
        model, _ = FastVisionModel.from_pretrained(adapter or base_path, load_in_4bit=True, dtype=torch_dtype(dtype),
                                                   use_gradient_checkpointing=False)
        FastVisionModel.for_inference(model)
        return model, backend
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_path, dtype=torch_dtype(dtype))
    if adapter:
        model = load_adapter(model, adapter, base_path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    model.requires_grad_(False)  # inference keeps no gradients; frozen weights may also be re-laid (pad_vision_mlp)
    return model, backend


def load_training_model(path: str, plan, lora: LoraSettings, seed: int, speedups_off: frozenset = frozenset()):
    """(LoRA model with the speed levers applied, host layout for the collator or None)."""
    from transformers import set_seed

    from common.speed import Speedups
    from common.speed.setup import apply_for_training
    set_seed(seed)  # before the LoRA weights are drawn: the Trainer seeds only after the model exists
    model = load_for_training(path, plan, lora, seed)
    return model, apply_for_training(model, Speedups(plan.backend, speedups_off))


def load_inference_model(base: str, adapter: str | None, backend: str, dtype: str = "auto",
                         speedups_off: frozenset = frozenset(), decoding: bool = True):
    """(model with the speed levers applied, backend, host layout or None, static decoder or None); `decoding`:
    whether prices are generated (a price head or embeddings need no decoder)."""
    from common.speed import Speedups
    from common.speed.setup import apply_for_inference
    model, backend = load_for_inference(base, adapter, backend, dtype)
    return (model, backend, *apply_for_inference(model, Speedups(backend, speedups_off), decoding))


def cap_gpu_memory(gib: float) -> None:
    """Hold this process to `gib` of the GPU's memory (--max-gpu-memory): a shared card, or a smaller card's
    budget measured on a bigger one. PyTorch's allocator then fails an allocation past the cap as it would past a
    full card."""
    import torch
    if gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
