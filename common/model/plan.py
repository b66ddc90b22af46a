"""The plan: how stages 6 and 7 run on the device found, chosen at start unless the user chose.

Training's plan fixes the backend, the base weights' precision (16-bit or 4-bit), the compute dtype (bf16, or
fp16 with loss scaling on a GPU without bf16, fp32 on a CPU), the micro-batch and the gradient accumulation
(micro-batch x accumulation x ranks = --global-batch-size, whatever the card: the same learning), which decoder
layers recompute their activations in the backward (gradient checkpointing, every n-th layer: on the hf backend a
token limit a level, the level then set per micro-batch by common.model.recompute), and whether the blocks are
compiled. Among the configurations whose longest batch is estimated to fit the budget (the card, or
--max-gpu-memory) it takes the one estimated fastest; an option the user gave is kept as given. Inference's plan
fixes the batch size the same way.

The estimates are a memory and a step-time model of the model's shape, with coefficients measured on an H200 and
an H100 with Qwen2.5-VL-3B (docs/performance.md). If a step still runs out of memory, stage 6
retries it at half the micro-batch and twice the accumulation (common.model.backoff).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 2**30
# Coefficients measured on an H200 and an H100 with Qwen2.5-VL-3B (the stored runs in bench/runs/): a step's peak is
# the weights, the LoRA state and FIXED_GIB, plus the activations of the micro-batch as padded (micro-batch x its
# longest sample), per token and decoder layer 2 x (ACT_HIDDEN x hidden + ACT_INTERMEDIATE x intermediate) bytes:
# 99 KB on the 3B. Fitted to the peaks of 16 x 1 without recomputation over two data sets whose longest samples
# are 1055 and 1318 tokens (63.8 and 77.7 GiB), and checked at 8 x 2 (42.8 GiB, 0.1% off).
ACT_HIDDEN, ACT_INTERMEDIATE = 4.58, 3.64
# The share of those activations held at the step's peak when every n-th decoder layer recomputes its own, from
# the same runs' peaks with recomputation (every 4th: 50.8 GiB, every 2nd: 37.8 and 45.3, every layer: 13.1 and
# 14.0), and the step's time against no recomputation.
CHECKPOINT_MEMORY = {0: 1.0, 4: 0.77, 2: 0.54, 1: 0.095}
# Unsloth keeps more activations than the hf path: 16 x 1 without recomputation peaked at 77.4 GiB on an H100 where
# the hf path peaked at 63.8 (same 320 rows, longest 1055 tokens; h100-unsloth). One point, fitted to the activations.
UNSLOTH_ACTIVATIONS = 1.24
CHECKPOINT_TIME = {0: 1.0, 4: 1.15, 2: 1.23, 1: 1.4}
# Inference: bytes a prompt token needs at the prefill's peak, per hidden unit (activations, KV cache).
INFER_PER_HIDDEN = 150.0
FIXED_GIB = 1.0        # the allocator's slack and the compile and cuBLAS workspaces, beyond weights and activations
SAFETY = 0.90          # plan to this share of the budget: the allocator's fragmentation, the model's error
# Time: a micro-step costs STEP_S (the host issuing ~5,000 kernels) plus TOKEN_S a token at the split's mean length,
# times the recomputation's cost (bf16 on the 3B; the plan ranks configurations, it promises no speed). Fitted to
# stage 6's median steps on an H200 (bench/RESULTS.md, the budget table): 16 x 1 0.27-0.30 s, 16 x 1 recomputing every
# layer 0.36 s, 8 x 2 0.45 s, 8 x 2 recomputing every layer 0.68 s; every 2nd and 4th layer scaled from the
# calibration's ratios. Halving the micro-batch costs more than recomputing on this card: the old fit,
# a step proportional to its tokens, had 48 and 80 GiB budgets train at 8 x 2, measured slower than 24 GiB's 16 x 1.
STEP_S, TOKEN_S = 0.15, 15.4e-6
CHECKPOINT_EVERY = (0, 4, 2, 1)  # off, every 4th layer, every 2nd, every layer
LEVELS = {0: "no layer", 4: "every 4th layer", 2: "every 2nd layer", 1: "every layer"}


@dataclass(frozen=True)
class Device:
    """What the plan needs of the device: None for a CPU."""
    name: str
    total_gib: float
    bf16: bool

    @classmethod
    def detect(cls) -> "Device | None":
        import torch
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return cls(props.name, props.total_memory / GIB, torch.cuda.is_bf16_supported())


@dataclass(frozen=True)
class ModelSize:
    params: int
    linear_params: int   # in nn.Linear layers: what a 4-bit base quantizes
    layers: int
    hidden: int
    intermediate: int
    lora_params: int     # at LoRA rank 16 on the language model's 7 projections

    @classmethod
    def of(cls, model_path: str) -> "ModelSize":
        """Counted on the meta device: no weights are read or allocated."""
        import torch
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(config)
        text = config.get_text_config(decoder=True)
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        lora = sum(16 * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "language_model" in name and name.rsplit(".", 1)[-1] in
                   ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        return cls(sum(p.numel() for p in model.parameters()), sum(m.weight.numel() for m in linear),
                   text.num_hidden_layers, text.hidden_size, text.intermediate_size, lora)


@dataclass(frozen=True)
class Request:
    """The user's options; "auto" and 0 leave a choice to the plan."""
    backend: str = "auto"
    base_precision: str = "auto"    # auto | 16bit | 4bit
    dtype: str = "auto"             # auto | bfloat16 | float16 | float32
    micro_batch: int = 0
    grad_accum: int = 0
    checkpointing: str = "auto"     # auto | on | off
    max_gpu_memory: float = 0.0     # GiB; 0: the card's
    global_batch: int = 16
    world: int = 1
    tokens: int = 640               # a sample's length, stage 5's 95th percentile: most batches pad to about it
    tokens_mean: int = 0            # for time: the mean (0: tokens)
    tokens_max: int = 0             # the longest sample: the batch that must fit (0: tokens)


@dataclass(frozen=True)
class Plan:
    device: str
    backend: str
    base_precision: str
    dtype: str
    micro_batch: int
    grad_accum: int
    checkpoint_every: int           # 0: off; n: every n-th decoder layer recomputes its activations
    compiled: bool                  # the compile lever's blocks (Unsloth compiles its own)
    budget_gib: float | None
    estimate_gib: float | None      # the longest sample's micro-batch
    chosen: tuple[str, ...] = field(default=())  # what the plan chose rather than the user
    why: str = ""
    # (every, most tokens in a micro-batch): the recomputation each micro-batch gets by its padded size, the least
    # that fits; empty: checkpoint_every for all. checkpoint_every is then a batch of 95th-percentile samples' level.
    recompute_limits: tuple[tuple[int, int], ...] = ()

    def every_for(self, tokens: int) -> int:
        """The recomputation for a micro-batch of `tokens` (its rows x its longest row)."""
        return next((every for every, most in self.recompute_limits if tokens <= most),
                    self.recompute_limits[-1][0] if self.recompute_limits else self.checkpoint_every)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    def line(self, world: int = 1) -> str:
        memory = (f"{self.budget_gib:.0f} GiB budget, ~{self.estimate_gib:.1f} GiB planned"
                  if self.budget_gib else "no GPU")
        levels = [f"{LEVELS[every]} up to {most:,} tokens" for every, most in self.recompute_limits[:-1]]
        checkpointing = (f"recomputing {', '.join(levels)} a micro-batch, {LEVELS[self.recompute_limits[-1][0]]} "
                         "beyond" if self.recompute_limits else f"recomputing {LEVELS[self.checkpoint_every]}")
        compiling = "compiled by Unsloth" if self.backend == "unsloth" else "compiled" if self.compiled else "eager"
        return (f"plan on {self.device} ({memory}): {self.backend}, {self.base_precision} base, {self.dtype}, "
                f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation x {world} rank(s) = "
                f"{self.micro_batch * self.grad_accum * world}, {checkpointing}, "
                f"{compiling}; chosen: {', '.join(self.chosen) or 'nothing (all given)'}"
                f"{'; ' + self.why if self.why else ''}")


def weights_gib(size: ModelSize, base_precision: str, dtype: str) -> float:
    element = 4 if dtype == "float32" else 2
    if base_precision == "4bit":
        return (size.linear_params * 0.53 + (size.params - size.linear_params) * element) / GIB
    return size.params * element / GIB


def token_gib(size: ModelSize, dtype: str, backend: str = "hf") -> float:
    """Activations a padded token keeps for the backward across the decoder layers, none recomputed."""
    per_layer = 2 * (ACT_HIDDEN * size.hidden + ACT_INTERMEDIATE * size.intermediate) * (2 if dtype == "float32"
                                                                                         else 1)
    return size.layers * per_layer / GIB * (UNSLOTH_ACTIVATIONS if backend == "unsloth" else 1.0)


def fixed_gib(size: ModelSize, base_precision: str, dtype: str) -> float:
    """A training step's memory beside the activations: weights, LoRA state, workspaces."""
    lora_state = size.lora_params * 16 / GIB  # fp32 weights, gradients and two Adam moments
    return weights_gib(size, base_precision, dtype) + lora_state + FIXED_GIB


def training_gib(size: ModelSize, base_precision: str, dtype: str, micro: int, tokens: int, every: int,
                 backend: str = "hf") -> float:
    """Estimated peak GPU memory of a training step."""
    activations = micro * tokens * token_gib(size, dtype, backend) * CHECKPOINT_MEMORY[every]
    return fixed_gib(size, base_precision, dtype) + activations


def inference_gib(size: ModelSize, base_precision: str, dtype: str, batch: int, tokens: int) -> float:
    return weights_gib(size, base_precision, dtype) + batch * tokens * INFER_PER_HIDDEN * size.hidden / GIB + FIXED_GIB


def step_seconds(size: ModelSize, micro: int, tokens: int, every: int) -> float:
    """Estimated time of one micro-step, scaled to the model's size from the 3B's."""
    return (STEP_S + micro * tokens * TOKEN_S * size.params / 3.75e9) * CHECKPOINT_TIME[every]


def _dtype(request: Request, device: Device | None) -> str:
    if request.dtype != "auto":
        return request.dtype
    if device is None:
        return "float32"
    return "bfloat16" if device.bf16 else "float16"


def _micro_batches(request: Request) -> list[int]:
    per_rank = request.global_batch // request.world
    if request.micro_batch:
        return [request.micro_batch]
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def problems(request: Request, device: Device | None) -> list[str]:
    """Options that cannot make a plan, all at once."""
    out = []
    if request.global_batch < 1 or request.global_batch % request.world:
        out.append(f"--global-batch-size {request.global_batch} must be a positive multiple of the {request.world} "
                   "rank(s)")
    elif request.micro_batch and (request.global_batch // request.world) % request.micro_batch:
        out.append(f"--batch-size {request.micro_batch} must divide the {request.global_batch // request.world} "
                   f"samples each rank contributes to --global-batch-size {request.global_batch}")
    if request.micro_batch and request.grad_accum and \
            request.micro_batch * request.grad_accum * request.world != request.global_batch:
        out.append(f"--batch-size {request.micro_batch} x --grad-accum {request.grad_accum} x {request.world} "
                   f"rank(s) != --global-batch-size {request.global_batch}")
    if device is None:
        for name, value, cpu_value in (("--dtype", request.dtype, "float32"),
                                       ("--base-precision", request.base_precision, "16bit")):
            if value not in ("auto", cpu_value):
                out.append(f"{name} {value} needs a CUDA GPU; this machine has none")
        if request.max_gpu_memory:
            out.append("--max-gpu-memory needs a CUDA GPU; this machine has none")
    elif request.dtype == "bfloat16" and not device.bf16:
        out.append(f"--dtype bfloat16: {device.name} has no bf16; use float16 (or auto)")
    return out


def plan_training(request: Request, device: Device | None, size: ModelSize, compiled: bool = True) -> Plan:
    """The fastest estimated configuration that fits, keeping every option the user gave. `compiled`: whether the
    compile lever is on (it is GPU-only)."""
    dtype = _dtype(request, device)
    chosen = tuple(name for name, value in (("backend", request.backend), ("base precision", request.base_precision),
                                            ("dtype", request.dtype), ("micro-batch", request.micro_batch),
                                            ("accumulation", request.grad_accum),
                                            ("checkpointing", request.checkpointing)) if value in ("auto", 0))
    backend = "hf" if request.backend == "auto" else request.backend
    per_rank = request.global_batch // request.world
    if device is None:
        micro = request.micro_batch or per_rank
        return Plan("CPU", backend, "16bit", dtype, micro, per_rank // micro, 1 if request.checkpointing == "on" else 0,
                    False, None, None, chosen, "a CPU: fp32, no compiling")
    budget = min(device.total_gib, request.max_gpu_memory or device.total_gib)
    precisions = ["16bit", "4bit"] if request.base_precision == "auto" else [request.base_precision]
    # Unsloth's recomputation is one switch for the run, every layer; on the hf backend it is chosen per micro-batch
    everys = {"auto": (0, 1) if backend == "unsloth" else CHECKPOINT_EVERY, "on": (1,), "off": (0,)}[
        request.checkpointing]
    adaptive = backend == "hf" and len(everys) > 1
    longest = request.tokens_max or request.tokens
    options = []
    for precision in precisions:
        for micro in _micro_batches(request):
            # the longest sample's batch must fit at some level; the time is a typical batch's, padded to the p95
            fitting = [e for e in everys if training_gib(size, precision, dtype, micro, longest, e, backend)
                       <= budget * SAFETY]
            if not fitting:
                continue
            usual = [e for e in everys if training_gib(size, precision, dtype, micro, request.tokens, e, backend)
                     <= budget * SAFETY] if adaptive else fitting[:1]
            every = usual[0] if usual else fitting[0]
            seconds = step_seconds(size, micro, request.tokens_mean or request.tokens, every)
            options.append((round(micro / seconds, 1), precision, micro, every, fitting[0]))
        if options:  # a 16-bit base that fits beats any 4-bit one (dequantizing costs every matmul)
            break
    why = ""
    if not options:  # nothing fits by the estimate: the smallest footprint, and the backoff if a step runs out
        micro = _micro_batches(request)[-1]
        options = [(0, precisions[-1], micro, everys[-1], everys[-1])]
        why = f"nothing is estimated to fit {budget:.0f} GiB: the smallest configuration allowed"
    _, precision, micro, every, longest_every = max(options)
    limits = recompute_limits(size, precision, dtype, budget * SAFETY, everys) if adaptive else ()
    gib = training_gib(size, precision, dtype, micro, longest, longest_every, backend)
    return Plan(device.name, backend, precision, dtype, micro, per_rank // micro, every, compiled, round(budget, 1),
                round(gib, 1), chosen, why, limits)


def recompute_limits(size: ModelSize, precision: str, dtype: str, gib: float, everys) -> tuple[tuple[int, int], ...]:
    """For each level, from none to every layer, the most tokens a micro-batch may hold to fit `gib` at it."""
    room, one = gib - fixed_gib(size, precision, dtype), token_gib(size, dtype)
    return tuple((e, max(0, int(room / (one * CHECKPOINT_MEMORY[e])))) for e in everys)


@dataclass(frozen=True)
class InferencePlan:
    device: str
    backend: str
    dtype: str
    batch: int
    decode: str                     # graphs (static cache, CUDA graphs) or generate (the library's loop)
    budget_gib: float | None
    estimate_gib: float | None

    def line(self, world: int = 1) -> str:
        memory = (f"{self.budget_gib:.0f} GiB budget, ~{self.estimate_gib:.1f} GiB planned" if self.budget_gib
                  else "no GPU")
        return (f"plan on {self.device} ({memory}): {self.backend}, {self.dtype}, batch {self.batch} x {world} "
                f"rank(s), decoding with {self.decode}")


def plan_inference(requested_batch: int, backend: str, dtype: str, decode: str, device: Device | None,
                   size: ModelSize, tokens: int, max_gpu_memory: float = 0.0) -> InferencePlan:
    """The user's batch size, or the largest power of two up to 64 whose prefill is estimated to fit."""
    if device is None:
        return InferencePlan("CPU", backend, dtype, requested_batch or 32, decode, None, None)
    budget = min(device.total_gib, max_gpu_memory or device.total_gib)
    fits = [b for b in (64, 32, 16, 8, 4, 2, 1) if inference_gib(size, "16bit", dtype, b, tokens) <= budget * SAFETY]
    batch = requested_batch or (fits[0] if fits else 1)
    return InferencePlan(device.name, backend, dtype, batch, decode, round(budget, 1),
                         round(inference_gib(size, "16bit", dtype, batch, tokens), 1))


def with_micro_batch(plan: Plan, micro: int) -> Plan:
    """The plan at another micro-batch, the accumulation grown to keep the global batch."""
    return replace(plan, micro_batch=micro, grad_accum=plan.micro_batch * plan.grad_accum // micro)
