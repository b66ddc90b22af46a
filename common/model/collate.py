"""Batching decoded samples for the model: padding, the label mask, the multimodal extras.

Labels are -100 everywhere except the answer tokens and the `<|im_end|>` that closes the answer, so the
model learns the price and learns to stop; the prompt, the image tokens, padding and any other special
token (id >= tokenizer.vocab_size) are masked. `mm_token_type_ids` (1 at image tokens) is rebuilt from
the ids: without it Qwen2.5-VL silently falls back to 1-D rotary positions.

Given the model's `HostLayout`, the batch also carries the position ids and vision-tower indices the model
would otherwise build on the GPU (common/positions.py): three rotary rows for a training forward, four (a
text row first) for generation. A training batch then also carries its attention mask ready-made: the 4-D
causal-and-padding mask transformers would build (none at all when no row is padded, which lets attention
run causal), because building it on the GPU reads two flags back to the host every forward; and each
sample's image tokens are checked here against its image grid, which the model re-checks on the GPU (another
read-back) unless `common.speed.positions.skip_image_readbacks` trusts this check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.speed.positions import HostLayout, batch_positions, sample_positions, vision_indices

IGNORE = -100


@dataclass
class Collator:
    pad_id: int
    image_token_id: int
    end_id: int                 # <|im_end|>
    vocab_size: int             # tokenizer.vocab_size: ids at or above are special tokens
    padding_side: str = "right"  # right for training, left for generation
    with_labels: bool = True
    drop_images: bool = False    # the text-only ablation: remove the image and its tokens
    vision_start_id: int = -1
    vision_end_id: int = -1
    host_ids: HostLayout | None = None  # set: add position ids and vision indices built here, on the host
    # The price head's batches (regression, embeddings): the prompt alone, right-padded, with each row's last
    # prompt position and, where known, its price
    pooled: bool = False

    def without_image(self, s: dict) -> dict:
        """The sample as a text-only chat would have encoded it (vision span cut, answer shifted)."""
        if s.get("pixel_values") is None:
            return s
        ids = s["input_ids"]
        start = int((ids == self.vision_start_id).nonzero()[0])
        end = int((ids == self.vision_end_id).nonzero()[0]) + 1
        cut = end - start
        shift = (lambda x: None if x is None else x - cut)
        return dict(s, input_ids=torch.cat([ids[:start], ids[end:]]), pixel_values=None, image_grid_thw=None,
                    answer_start=shift(s.get("answer_start")), answer_end=shift(s.get("answer_end")))

    def labels_for(self, ids: torch.Tensor, start: int | None, end: int | None) -> torch.Tensor:
        labels = torch.full_like(ids, IGNORE)
        if start is None:
            return labels
        labels[start:end] = ids[start:end]
        special = labels >= self.vocab_size
        special[end - 1] = special[end - 1] & (ids[end - 1] != self.end_id)  # the closing <|im_end|> is learned
        labels[special] = IGNORE
        return labels

    def __call__(self, samples: list[dict]) -> dict:
        if self.drop_images:
            samples = [self.without_image(s) for s in samples]
        if not self.with_labels:  # generation and the head: a labelled sample is cut where its answer starts
            samples = [dict(s, input_ids=s["input_ids"][:s["answer_start"]]) if s.get("answer_start") else s
                       for s in samples]
        longest = max(len(s["input_ids"]) for s in samples)
        batch_ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), longest), dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
        columns = []
        for i, s in enumerate(samples):
            ids = s["input_ids"]
            n = len(ids)
            cols = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            columns.append(cols)
            batch_ids[i, cols] = ids
            mask[i, cols] = 1
            if self.with_labels:
                labels[i, cols] = self.labels_for(ids, s.get("answer_start"), s.get("answer_end"))
        batch = {"input_ids": batch_ids, "attention_mask": mask,
                 "mm_token_type_ids": (batch_ids == self.image_token_id).to(torch.int)}
        pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples
                                                 if s.get("pixel_values") is not None])
        if self.host_ids is not None:
            batch.update(self.host_built(samples, columns, longest, batch.get("image_grid_thw")))
            if self.padding_side == "right":
                del batch["attention_mask"]
        if self.with_labels:
            batch["labels"] = labels
        if self.pooled:
            batch["last_positions"] = torch.tensor([len(s["input_ids"]) - 1 for s in samples])
            if all(s.get("price") is not None for s in samples):
                batch["price_targets"] = torch.tensor([float(s["price"]) for s in samples])
        return batch

    def host_built(self, samples: list[dict], columns: list[slice], width: int, grids) -> dict:
        """position_ids (a text row first when generating, as generate() lays them out) and, with images, the
        vision tower's indices."""
        layout = self.host_ids
        for s in samples:
            if s.get("pixel_values") is not None:
                check_image_tokens(s, layout)
        per_sample = [sample_positions(s["input_ids"], s.get("image_grid_thw") if s.get("pixel_values") is not None
                                       else None, layout.image_token_id, layout.merge_size) for s in samples]
        generating = not self.with_labels and not self.pooled
        out = {"position_ids": batch_positions(per_sample, columns, width, text_row=generating)}
        if grids is not None:
            out.update(vision_indices(grids, layout))
        return out


def check_image_tokens(sample: dict, layout: HostLayout) -> None:
    expected = int(sample["image_grid_thw"].prod(-1).sum()) // layout.merge_size ** 2
    found = int((sample["input_ids"] == layout.image_token_id).sum())
    if found != expected:
        raise ValueError(f"sample {sample.get('sample_id', '?')}: {found} image tokens for an image grid of "
                         f"{sample['image_grid_thw'].tolist()} ({expected} expected); re-run stage 4 for it")


def for_tokenizer(tokenizer, padding_side: str = "right", with_labels: bool = True,
                  drop_images: bool = False, host_ids: HostLayout | None = None, pooled: bool = False) -> Collator:
    """pooled: the price head's batches (prompt only, right padding, last positions, prices)."""
    if pooled:
        padding_side, with_labels = "right", False
    ids = tokenizer.convert_tokens_to_ids
    return Collator(pad_id=tokenizer.pad_token_id, image_token_id=ids("<|image_pad|>"), end_id=ids("<|im_end|>"),
                    vocab_size=tokenizer.vocab_size, padding_side=padding_side, with_labels=with_labels,
                    drop_images=drop_images, vision_start_id=ids("<|vision_start|>"),
                    vision_end_id=ids("<|vision_end|>"), host_ids=host_ids, pooled=pooled)
