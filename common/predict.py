"""Generating prices: number-constrained greedy decoding over left-padded batches.

Training's evaluation and stage 7 both call `predict_batch`, so the validation SMAPE seen during
training is what inference will produce.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from common.encode import normalize_patches_torch
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
    """Only `D+(.D{1,2})?` then <|im_end|> may be generated: digits, one point, at most two decimals."""

    def __init__(self, tokenizer, prompt_length: int):
        self.digit_ids, self.dot_id = number_tokens(tokenizer)
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.prompt_length = prompt_length

    def allowed(self, generated: list[int]) -> list[int]:
        if generated and generated[-1] == self.end_id:
            return [self.end_id]  # finished rows keep emitting the end token while others continue
        if self.dot_id in generated:
            decimals = len(generated) - generated.index(self.dot_id) - 1
            return ([self.end_id] if decimals else []) + (self.digit_ids if decimals < MAX_DECIMALS else [])
        n = len(generated)
        if n == 0:
            return self.digit_ids
        return [self.end_id, self.dot_id] + (self.digit_ids if n < MAX_INT_DIGITS else [])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            mask[row, self.allowed(ids)] = 0
        return scores + mask


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


@torch.no_grad()
def predict_batch(model, tokenizer, batch: dict, constrain: bool = True, spec=None) -> list[float | None]:
    """Greedy prices for one left-padded batch (collator with padding_side='left', no labels)."""
    device = next(model.parameters()).device
    inputs = with_normalized_pixels({k: v.to(device, non_blocking=True) for k, v in batch.items()}, spec)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    prompt_length = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([NumberConstraint(tokenizer, prompt_length)]) if constrain else None
    out = model.generate(**inputs, max_new_tokens=max_new_tokens(), do_sample=False, num_beams=1,
                         logits_processor=processors, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    texts = tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
    return [parse_price(t) for t in texts]
