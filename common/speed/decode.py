"""Greedy decoding of a few tokens over a static KV cache, the decode step optionally replayed as a CUDA graph.

A price is ~10 tokens. generate() spends ~36 ms of kernel launches and Python per decode step of 64 rows on an
H100 for a few ms of GPU work (bench/gpu_runs/h100-h.json: 9 steps, 324 ms of a 1,087 ms batch). Here the
prompt's keys and values go into a transformers `StaticCache`, so every decode step of a batch has the same
shapes and tensor addresses: captured once per (rows, cache length) as a CUDA graph, a step is one replay.
Cache lengths are rounded up to `bucket` so that a few graphs serve every prompt length, and every step's
cache is a view of one shared `KVArena`: with a cache of its own per step, only a few steps fitted, and a
length-sorted window, climbing through ~10 lengths, re-captured most of them in every window (h100-p: 9
captures in 20 batches).

The prefill runs each row right-aligned (its padding moved to the end): a causal prompt then needs no mask, so
SDPA takes its flash kernel with grouped key/value heads instead of the masked kernel fed with copied heads.

Attention in a decode step attends one query per head over the whole cache. transformers' `sdpa` copies each of
Qwen2.5-3B's 2 key/value heads 8 times to match its 16 query heads whenever there is a padding mask (SDPA's
grouped-query mode needs mask=None): measured in the graphed step (run h100-k), that copy was half of its GPU
time (10.6 of 21.8 ms) and attention another quarter. `grouped_decode_sdpa` instead folds each group's 8 query
heads into the query length of one SDPA call over the group's shared head: no copy, the same kernel and math.

The tokens are greedy generate()'s in exact arithmetic (tested in fp32): the same position ids (the last prompt
position + 1 per step), constraint and stopping; a finished row keeps <|im_end|> where generate pads (both
decode to the same text). In bf16 the mask-free prefill kernel rounds differently from generate()'s masked one,
so near-tied logits can differ (measured on a random-weight 3B: 1,071 of 1,280 prices equal, h100-p).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

ATTENTION = "sdpa_grouped_decode"


def grouped_decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' `sdpa`, except for one query token with grouped key/value heads: query [b, heads, 1, d]
    becomes [b, kv_heads, group, d] (head h reads kv head h // group, as repeat_kv has it), one SDPA call."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    out = F.scaled_dot_product_attention(query.view(rows, heads // groups, groups, dim), key, value,
                                         attn_mask=attention_mask, scale=scaling)  # mask [b, 1, 1, S] broadcasts
    return out.reshape(rows, 1, heads, dim), None


def use_grouped_decode_attention(model) -> bool:
    """Point the language model's attention at grouped_decode_sdpa (its prefill and training forwards stay
    transformers' sdpa). False, changing nothing, where the language model does not run on sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    text = model.config.get_text_config(decoder=True)
    if text._attn_implementation not in ("sdpa", ATTENTION):
        return False
    AttentionInterface.register(ATTENTION, grouped_decode_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    text._attn_implementation = ATTENTION
    return True


SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def right_aligned(mask: torch.Tensor) -> torch.Tensor:
    """[rows, L] gather index that moves each left-padded row's tokens to the start, its padding to the end."""
    length = mask.shape[1]
    pad = length - mask.sum(1, keepdim=True)
    return (torch.arange(length, device=mask.device)[None, :] + pad) % length


class KVArena:
    """Key and value memory for every layer, shared by all decode steps: a step's [rows, heads, cache_len, dim]
    cache is a contiguous view of its start. Only one batch decodes at a time, and its prefill writes the
    slots it reads (the rest are masked), so what an earlier batch left there is never attended to. Zeroed
    once: masked slots must hold finite numbers (a masked NaN still poisons SDPA's sum)."""

    def __init__(self, model):
        text = model.config.get_text_config(decoder=True)
        param = next(model.parameters())
        self.layers, self.heads = text.num_hidden_layers, text.num_key_value_heads
        self.dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.dtype, self.device = param.dtype, param.device
        self.capacity, self.keys, self.values = 0, [], []

    def fits(self, rows: int, cache_len: int) -> bool:
        return rows * cache_len <= self.capacity

    def grow(self, rows: int, cache_len: int) -> None:
        """Room for rows x cache_len slots and half as many again (lengths climb inside a sorted window). Views
        of the old memory are then stale: the caller drops every step that holds one."""
        self.capacity = rows * cache_len * 3 // 2
        self.keys = self.values = []  # freed before the larger memory is taken
        size = self.capacity * self.heads * self.dim
        self.keys = [torch.zeros(size, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.values = [torch.zeros(size, dtype=self.dtype, device=self.device) for _ in range(self.layers)]

    def attach(self, cache, rows: int, cache_len: int) -> None:
        """Point the layers of a transformers StaticCache, initialized on the meta device, at views of this
        memory (and its write index at this device)."""
        n = rows * self.heads * cache_len * self.dim
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            assert layer.keys.shape == (rows, self.heads, cache_len, self.dim)
            layer.keys = keys[:n].view(rows, self.heads, cache_len, self.dim)
            layer.values = values[:n].view(rows, self.heads, cache_len, self.dim)
            layer.device = self.device
            layer.cumulative_length = torch.zeros((), dtype=torch.long, device=self.device)


class DecodeStep:
    """One batch shape's decode step: a static cache of `cache_len` slots (in the shared arena), input buffers
    and, if captured, the CUDA graph that runs the language model on them. State advances inside the step
    (slot, positions, the cache's own write index), so a replay needs nothing copied in but the new tokens."""

    def __init__(self, model, rows: int, cache_len: int, position_rows: int, capture: bool, arena: KVArena):
        from transformers import StaticCache
        param = next(model.parameters())
        self.model, self.rows, self.cache_len = model, rows, cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        # initialized on the meta device (its own tensors take no memory), then pointed at the arena
        self.cache.early_initialization(batch_size=rows, num_heads=arena.heads, head_dim=arena.dim,
                                        dtype=param.dtype, device="meta")
        arena.attach(self.cache, rows, cache_len)
        text = model.config.get_text_config(decoder=True)
        self.mask_kinds = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]))
        device = param.device
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(position_rows, rows, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, cache_len, dtype=torch.bool, device=device)
        self.graph = None
        if capture:
            self._capture()

    def _forward(self) -> torch.Tensor:
        self.mask.index_fill_(3, self.slot, True)  # the new token sees itself
        out = self.model(input_ids=self.tokens, position_ids=self.positions, past_key_values=self.cache,
                         attention_mask={kind: self.mask for kind in self.mask_kinds}, use_cache=True)
        self.slot.add_(1)
        self.positions.add_(1)
        return out.logits[:, -1].float()

    def _capture(self) -> None:
        self.mask[..., 0] = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a warm-up run off the capture stream, as torch.cuda.graphs asks
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: stage 7 pins the next batch in another thread meanwhile, and in the default (global)
        # mode that thread's CUDA host allocations invalidate this capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._forward()

    def prefill(self, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompt, moved to the right of each row, into the cache; the float logits of each
        row's last prompt token. Right-padded, a causal prompt needs no mask (padding only follows what a row
        attends to), so SDPA takes its flash kernel with grouped heads: no mask, no key/value copies."""
        rows, prompt_len = inputs["input_ids"].shape
        mask = inputs["attention_mask"]
        order = right_aligned(mask)
        moved = {k: v.gather(1, order) if k in SEQUENCE_KEYS else v for k, v in inputs.items()}
        moved["attention_mask"] = None
        positions = positions.gather(2, order.expand(positions.shape[0], -1, -1))
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        hidden = self.model.model(**moved, position_ids=positions, past_key_values=cache,
                                  use_cache=True).last_hidden_state
        last = (mask.sum(1) - 1)[:, None]
        for static, prompt in zip(self.cache.layers, cache.layers):
            static.keys[:, :, :prompt_len].copy_(prompt.keys)
            static.values[:, :, :prompt_len].copy_(prompt.values)
            static.cumulative_length.fill_(prompt_len)
        self.mask.zero_()
        self.mask[:, 0, 0, :prompt_len] = mask.gather(1, order).bool()
        self.slot.fill_(prompt_len)
        self.positions.copy_(positions.gather(2, last[None].expand(positions.shape[0], -1, -1)) + 1)
        rows_last = hidden[torch.arange(rows, device=hidden.device), last[:, 0]]
        return self.model.lm_head(rows_last).float()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; the float logits of the next."""
        self.tokens.copy_(tokens[:, None])
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


class HostFlag:
    """A device boolean copied to pinned host memory behind an event: reading it waits for the copy only, not
    for the work queued after it (a plain bool(tensor) would wait for the whole stream)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.copied = torch.cuda.Event() if self.cuda else None

    def send(self, flag: torch.Tensor) -> None:
        self.host.copy_(flag, non_blocking=self.cuda)
        if self.cuda:
            self.copied.record()

    def read(self) -> bool:
        if self.cuda:
            self.copied.synchronize()
        return bool(self.host)


class StaticDecoder:
    """Greedy decoding for left-padded batches through `DecodeStep`s, kept per (rows, cache length), the
    `keep` most recently used (the caches share one arena; each graph keeps its own few buffers)."""

    def __init__(self, model, graphs: bool, bucket: int = 128, keep: int = 32):
        if graphs and not torch.cuda.is_available():
            raise ValueError("CUDA-graph decoding needs a GPU; use the eager static decoder on CPU")
        self.model, self.graphs, self.bucket, self.keep = model, graphs, bucket, keep
        self.mode = "graphs" if graphs else "static"
        self.grouped_attention = use_grouped_decode_attention(model)
        if not self.grouped_attention:  # its boolean decode mask means "attend" to sdpa only
            attention = model.config.get_text_config(decoder=True)._attn_implementation
            raise ValueError(f"the static decoder needs the language model on sdpa attention, not {attention}; "
                             "use --decode generate")
        self.steps: OrderedDict[tuple[int, int], DecodeStep] = OrderedDict()
        self.arena = KVArena(model)
        self.captures = 0

    def step_for(self, rows: int, needed: int, position_rows: int) -> DecodeStep:
        key = (rows, -(-needed // self.bucket) * self.bucket)
        if key in self.steps:
            self.steps.move_to_end(key)
            return self.steps[key]
        if not self.arena.fits(*key):
            self.steps.clear()
            self.arena.grow(*key)
        while len(self.steps) >= self.keep:
            self.steps.popitem(last=False)
        self.steps[key] = DecodeStep(self.model, *key, position_rows, capture=self.graphs, arena=self.arena)
        self.captures += self.graphs
        return self.steps[key]

    @torch.no_grad()
    def generate(self, inputs: dict, positions: torch.Tensor, max_new_tokens: int, end_id: int,
                 constraint=None) -> torch.Tensor:
        """[rows, n <= max_new_tokens] greedy tokens; after a row's <|im_end|>, <|im_end|> again."""
        rows, prompt_len = inputs["input_ids"].shape
        step = self.step_for(rows, prompt_len + max_new_tokens - 1, positions.shape[0])
        scores = step.prefill(inputs, positions)
        generated = inputs["input_ids"].new_empty(rows, 0)
        finished = torch.zeros(rows, dtype=torch.bool, device=generated.device)
        done = HostFlag(generated.device)
        for n in range(max_new_tokens):
            if constraint is not None:
                scores = constraint(generated, scores)
            token = scores.argmax(-1).masked_fill(finished, end_id)
            generated = torch.cat([generated, token[:, None]], dim=1)
            finished |= token == end_id
            if n == max_new_tokens - 1:
                break
            done.send(finished.all())
            scores = step(token)
            # Read the flag only once the next step is queued: the GPU runs that step while the host reads and
            # queues the one after (reading first left the GPU idle for each graph launch, ~3.6 ms a step on an
            # H100). The step queued after the last token is wasted, once per batch; the tokens are the same.
            if done.read():
                break
        return generated
