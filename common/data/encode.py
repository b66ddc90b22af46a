"""Turning one chat into model inputs: chat template, image patches, token ids, the answer's place.

What Qwen2.5-VL's processor does, split so that it can be stored compactly and exactly:
- the image (already at the processor's size, stage 2) is cut into 14x14 patches in the processor's order
  and kept as uint8 `[num_patches, 3*14*14]`; `normalize_patches` gives back the processor's float32
  `pixel_values [num_patches, 3*2*14*14]` (the two temporal copies are identical), to within float rounding;
- the chat template is rendered once per layout with a sentinel for the catalog, so the fixed parts are
  tokenized once and only the catalog text and the answer per sample; `<|image_pad|>` is repeated
  num_patches / merge_size**2 times;
- `--max-length` cuts the catalog text only, never image tokens or the answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from common.errors import PipelineError
from common.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, load_resized
from common.prompt import SYSTEM_PROMPT, catalog_from_user_text, message_parts, user_text

if TYPE_CHECKING:
    import torch

SENTINEL = "\u2063CATALOG\u2063"
# Qwen2-VL's chat template, reduced to what this project sends (text and image parts).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class SampleError(PipelineError, ValueError):
    """A sample that cannot be encoded; `reason` is what stats.json counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class ImageSpec:
    mean: np.ndarray          # [3] float32
    std: np.ndarray
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    @classmethod
    def from_model(cls, model_path: str) -> "ImageSpec":
        cfg_path = Path(model_path) / "preprocessor_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
        else:  # a hub id: the processor config comes from the hub cache
            from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
            cfg = Qwen2VLImageProcessorPil.from_pretrained(model_path).to_dict()
        return cls(np.asarray(cfg["image_mean"], np.float32), np.asarray(cfg["image_std"], np.float32),
                   cfg.get("patch_size", 14), cfg.get("merge_size", 2), cfg.get("temporal_patch_size", 2))


def image_to_patches(img: Image.Image, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """uint8 patches [grid_h*grid_w, 3*p*p] in the processor's order, and image_grid_thw [1, 3]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)  # C, H, W
    c, h, w = arr.shape
    p, m = spec.patch_size, spec.merge_size
    if h % (p * m) or w % (p * m):
        raise SampleError("bad_image_size", f"{w}x{h} is not a multiple of {p * m}; resize with stage 2")
    gh, gw = h // p, w // p
    x = arr.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    return np.ascontiguousarray(x.reshape(gh * gw, c * p * p)), np.array([[1, gh, gw]], dtype=np.int64)


def normalize_patches(patches_u8: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """The processor's float32 pixel_values [N, C*T*p*p] from the stored uint8 patches [N, C*p*p]."""
    n = patches_u8.shape[0]
    c, p, t = 3, spec.patch_size, spec.temporal_patch_size
    x = patches_u8.reshape(n, c, 1, p * p).astype(np.float32) * np.float32(1 / 255)
    x = (x - spec.mean.reshape(1, c, 1, 1)) / spec.std.reshape(1, c, 1, 1)
    return np.ascontiguousarray(np.broadcast_to(x, (n, c, t, p * p)).reshape(n, c * t * p * p))


def normalize_patches_torch(patches: "torch.Tensor", spec: ImageSpec) -> "torch.Tensor":
    """normalize_patches for a uint8 torch tensor on any device: the same float32 operations in the same
    order, so the same values. Stages 6 and 7 pass uint8 patches through their loaders (8x fewer bytes
    to concatenate, pin and copy than float32) and normalize here, after the copy to the GPU."""
    import torch
    n = patches.shape[0]
    c, p, t = 3, spec.patch_size, spec.temporal_patch_size
    mean, std = (device_constant(v, patches.device).reshape(1, c, 1, 1) for v in (spec.mean, spec.std))
    x = patches.reshape(n, c, 1, p * p).to(torch.float32) * np.float32(1 / 255).item()
    x = (x - mean) / std
    return x.expand(n, c, t, p * p).reshape(n, c * t * p * p)


_DEVICE_CONSTANTS: dict = {}


def device_constant(values, device) -> "torch.Tensor":
    """A small constant (array or tuple of numbers) copied to its device once per process: from pageable host
    memory each copy waits for the device's queue (the pixel mean and std were two such waits in every training
    step and inference batch, profiled: h100-r; the constraint's token ids one per decode step)."""
    import torch
    values = np.asarray(values)
    key = (values.tobytes(), str(values.dtype), str(device))
    if key not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[key] = torch.as_tensor(values, device=device)
    return _DEVICE_CONSTANTS[key]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        for name in ("chat_template.jinja", "chat_template.json"):
            p = Path(path) / name
            if p.exists():
                text = p.read_text()
                tok.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        else:
            tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    return tok


class Encoder:
    """Chat -> ids. One per process; the template's fixed parts are tokenized once per layout."""

    def __init__(self, tokenizer, spec: ImageSpec, max_length: int = 2048,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.tok = tokenizer
        self.spec = spec
        self.max_length = max_length
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._layouts = {}

    def _layout(self, has_image: bool) -> tuple[list[int], list[int]]:
        if has_image not in self._layouts:
            content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": user_text(SENTINEL)}]
            messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                        {"role": "user", "content": content}]
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if text.count(SENTINEL) != 1:
                raise SampleError("bad_chat_template", "the model's chat template dropped the user text")
            pre, post = text.split(SENTINEL)
            ids = (self.tok(pre, add_special_tokens=False)["input_ids"],
                   self.tok(post, add_special_tokens=False)["input_ids"])
            if has_image and ids[0].count(self.image_token_id) != 1:
                raise SampleError("bad_chat_template", "expected one <|image_pad|> for the image part")
            self._layouts[has_image] = ids
        return self._layouts[has_image]

    def load_image(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            img = load_resized(path, self.min_pixels, self.max_pixels)
        except (FileNotFoundError, ValueError) as err:
            raise SampleError(getattr(err, "reason", "image_unreadable"), f"{path}: {err}") from None
        return image_to_patches(img, self.spec)

    def encode(self, messages: list[dict], load_pixels: bool = True) -> dict:
        """input_ids (int32), patches (uint8 or None), grid, answer_start/end, truncation count."""
        text, image_path, answer = message_parts(messages)
        catalog = catalog_from_user_text(text)
        patches = grid = None
        if image_path is not None and load_pixels:
            patches, grid = self.load_image(image_path)
        pre, post = self._layout(image_path is not None)
        n_image_tokens = 0
        if grid is not None:
            n_image_tokens = int(grid.prod()) // self.spec.merge_size ** 2
            k = pre.index(self.image_token_id)
            pre = pre[:k] + [self.image_token_id] * n_image_tokens + pre[k + 1:]
        cat_ids = self.tok(catalog, add_special_tokens=False)["input_ids"]
        ans_ids = (self.tok(answer, add_special_tokens=False)["input_ids"] + [self.end_id]) if answer is not None else []
        room = self.max_length - len(pre) - len(post) - len(ans_ids)
        if room < 0:
            raise SampleError("too_long", f"{len(pre) + len(post) + len(ans_ids)} tokens without the catalog "
                                          f"text > --max-length {self.max_length}")
        dropped = max(0, len(cat_ids) - room)
        if dropped:
            cat_ids = cat_ids[:room]
        ids = pre + cat_ids + post
        answer_start = len(ids) if answer is not None else None
        ids = np.asarray(ids + ans_ids, dtype=np.int32)
        return {"input_ids": ids, "patches": patches, "image_grid_thw": grid, "answer_start": answer_start,
                "answer_end": len(ids) if answer is not None else None, "catalog_tokens_dropped": dropped,
                "n_image_tokens": n_image_tokens}


def validate(sample: dict, spec: ImageSpec, image_token_id: int) -> None:
    """Image-pad count = num_patches / merge^2 and num_patches = t*h*w, or SampleError."""
    ids, grid, patches = sample["input_ids"], sample.get("image_grid_thw"), sample.get("patches")
    n_pad = int((ids == image_token_id).sum())
    if grid is None:
        if n_pad:
            raise SampleError("grid_mismatch", f"{n_pad} image tokens but no image")
        return
    num_patches = int(np.prod(grid))
    if patches is not None and patches.shape[0] != num_patches:
        raise SampleError("grid_mismatch", f"{patches.shape[0]} patches, grid {grid.tolist()} says {num_patches}")
    if n_pad * spec.merge_size ** 2 != num_patches:
        raise SampleError("grid_mismatch", f"{n_pad} image tokens for {num_patches} patches "
                                           f"(merge {spec.merge_size})")
