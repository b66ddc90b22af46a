"""Generating prices: number-constrained greedy decoding over left-padded batches.

Training's evaluation and stage 7 both call `predict_batch`, so the validation SMAPE seen during
training is what inference will produce.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from common.data.encode import device_constant, normalize_patches_torch
from common.speed.positions import VISION_KEYS
from common.prompt import parse_price

MAX_INT_DIGITS = 6
MAX_DECIMALS = 2


_NUMBER_TOKENS: dict[int, tuple[list[int], int]] = {}


def number_tokens(tokenizer) -> tuple[list[int], int]:
    """(ids of the ten one-digit tokens, id of '.'), looked up once per tokenizer."""
    if id(tokenizer) not in _NUMBER_TOKENS:
        digits = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(str(d))) for d in range(10)]
        dot = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("."))
        if any(len(d) != 1 for d in digits) or len(dot) != 1:
            raise ValueError("constrained decoding needs single-token digits and '.'; this tokenizer has none")
        _NUMBER_TOKENS[id(tokenizer)] = ([d[0] for d in digits], dot[0])
    return _NUMBER_TOKENS[id(tokenizer)]


class NumberConstraint(LogitsProcessor):
    """Only `D+(.D{1,2})?` then <|im_end|> may be generated: digits, one point, at most two decimals.

    The rule is evaluated on the GPU for all rows at once: a per-row Python loop would copy the generated ids
    to the host and back at every step (one synchronization per row per step, 1,300 per batch of 64)."""

    def __init__(self, tokenizer, prompt_length: int):
        digit_ids, dot_id = number_tokens(tokenizer)
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.dot_id = dot_id
        self.candidate_ids = (*digit_ids, dot_id, self.end_id)  # columns: 10 digits, '.', end
        self.prompt_length = prompt_length

    def allowed(self, generated: torch.LongTensor) -> torch.BoolTensor:
        """[rows, 12] over (digits, '.', end): which may come next after each row's generated ids."""
        rows, n = generated.shape
        if n == 0:
            return (torch.arange(12, device=generated.device) < 10).expand(rows, -1)
        # generate() pads a finished row with pad tokens; end stays allowed right after <|im_end|> so that a
        # finished row never has every token at -inf
        ended = generated[:, -1] == self.end_id
        is_dot = generated == self.dot_id
        has_dot = is_dot.any(1)
        decimals = n - 1 - is_dot.int().argmax(1)  # tokens after the first point
        digit = torch.where(has_dot, decimals < MAX_DECIMALS, n < MAX_INT_DIGITS) & ~ended
        dot = ~has_dot & ~ended
        end = torch.where(has_dot, decimals > 0, True) | ended
        return torch.cat([digit[:, None].expand(-1, 10), dot[:, None], end[:, None]], dim=1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = device_constant(self.candidate_ids, scores.device)
        kept = torch.where(self.allowed(input_ids[:, self.prompt_length:]), scores[:, ids], float("-inf"))
        return torch.full_like(scores, float("-inf")).index_copy_(1, ids, kept)


def max_new_tokens() -> int:
    return MAX_INT_DIGITS + 1 + MAX_DECIMALS + 1


def with_normalized_pixels(inputs: dict, spec) -> dict:
    """uint8 patches (already on their device) -> the processor's float32 pixel_values; float ones pass."""
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.dtype != torch.uint8:
        return inputs
    if spec is None:
        raise ValueError("uint8 pixel patches need the model's ImageSpec to be normalized")
    return {**inputs, "pixel_values": normalize_patches_torch(pixels, spec)}


def prepare_batch(batch: dict) -> dict:
    """A collated batch made ready on the host: on a GPU machine its tensors pinned, so that the copy to the GPU
    does not block. Stage 7 runs it in a thread for the next batch while the GPU works on this one."""
    if torch.cuda.is_available():
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


@torch.no_grad()
def predict_batch(model, tokenizer, batch: dict, constrain: bool = True, spec=None,
                  decoder=None) -> list[float | None]:
    """Greedy prices for one left-padded batch (collator with padding_side='left', no labels), as collated or
    from prepare_batch. Position ids the collator built on the host go to generate() as they are.
    decoder: a `common.speed.decode.StaticDecoder` to decode with instead of generate() (the same greedy tokens in
    exact arithmetic; bf16 kernels may round near-ties differently; it needs the host position ids)."""
    device = next(model.parameters()).device
    if decoder is not None and "position_ids" not in batch:
        raise ValueError(f"{type(model).__name__} has no host position ids: decode with generate()")
    inputs = with_normalized_pixels({k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                                     for k, v in batch.items()}, spec)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if decoder is not None:
        constraint = NumberConstraint(tokenizer, 0) if constrain else None
        generated = decoder.generate(inputs, inputs.pop("position_ids"), max_new_tokens(), end_id, constraint)
    else:
        # generate() refuses keyword arguments its model's signature does not name; it builds these itself
        inputs = {k: v for k, v in inputs.items() if k not in VISION_KEYS}
        prompt_length = inputs["input_ids"].shape[1]
        processors = LogitsProcessorList([NumberConstraint(tokenizer, prompt_length)]) if constrain else None
        # repetition_penalty=1.0: Qwen's generation config ships a penalty that generate() applies even when
        # greedy; it would push down digits a price repeats (11.99), and the static decoder applies none
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens(), do_sample=False, num_beams=1,
                                   repetition_penalty=1.0, logits_processor=processors,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=end_id)[:, prompt_length:]
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [parse_price(t) for t in texts]
