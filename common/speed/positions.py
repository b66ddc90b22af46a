"""Position ids built on the host while a batch is collated, so the GPU never waits for them.

Qwen2.5-VL gives every token three rotary positions (time, height, width). Left to the model, a forward
computes them on the GPU: a Python loop per row of tiny kernels, each image's grid read back to the host
(`.tolist()`), and the vision tower's own window and position indices built the same way. On an H100 that
kept the GPU idle for ~100 ms of each batch of 64 (bench/gpu_runs/h100-f.json), and when stage 7 moved it
to a thread, that thread's Python held the interpreter lock the launching thread needed
(bench/gpu_runs/h100-p.json: a 48 ms gap charged to `get_rope_index`).

Here one sample's positions are a few vectorized ops over its (at most a few) text and image runs, done in
the dataloader's worker (training) or the batch-preparing thread (stage 7), and equal, position for
position, to what the model computes (tested against its `get_rope_index` and generate()'s ids).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class HostLayout:
    """What the host needs from a Qwen2.5-VL config to build the ids its forward would build."""
    image_token_id: int
    merge_size: int      # vision_config.spatial_merge_size
    window_size: int     # vision_config.window_size, in pixels
    patch_size: int      # vision_config.patch_size

    @classmethod
    def from_model(cls, model) -> "HostLayout | None":
        """None for a model without Qwen2.5-VL's windowed vision tower (it then builds its own ids)."""
        config = model.config
        vision = getattr(config, "vision_config", None)
        if getattr(vision, "window_size", None) is None or getattr(config, "image_token_id", None) is None:
            return None
        return cls(config.image_token_id, vision.spatial_merge_size, vision.window_size, vision.patch_size)


def sample_positions(ids: torch.Tensor, grids: torch.Tensor | None, image_token_id: int,
                     merge_size: int) -> torch.Tensor:
    """[3, n] rotary positions of one unpadded sample: text runs count on; an image run of t x h x w patches
    (merged merge_size x merge_size) takes (start, start + row, start + column) and the text after it resumes
    at start + max(h, w) / merge_size, as the model's `get_rope_index` has it (its time step is 1 for images)."""
    is_image = ids == image_token_id
    n = ids.numel()
    if not bool(is_image.any()):
        return torch.arange(n).expand(3, n).clone()
    if grids is None:
        raise ValueError("a sample with image tokens but no image grid")
    edges = (torch.nonzero(is_image[1:] != is_image[:-1]).flatten() + 1).tolist()
    bounds = [0, *edges, n]
    parts, current, image = [], 0, 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        if not is_image[start]:
            parts.append(torch.arange(current, current + end - start).expand(3, -1))
            current += end - start
            continue
        if image >= len(grids):
            raise ValueError(f"{image + 1} image runs in a sample with {len(grids)} image grids")
        t, h, w = (int(x) for x in grids[image])
        grid = _grid_positions(t, h // merge_size, w // merge_size)
        if grid.shape[1] != end - start:
            raise ValueError(f"image {image}: {end - start} image tokens for a {t}x{h}x{w} grid "
                             f"({grid.shape[1]} after a {merge_size}x{merge_size} merge)")
        parts.append(grid + current)
        current += max(h, w) // merge_size
        image += 1
    return torch.cat(parts, dim=1)


@lru_cache(maxsize=64)
def _grid_positions(t: int, h: int, w: int) -> torch.Tensor:
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1)


def batch_positions(per_sample: list[torch.Tensor], columns: list[slice], width: int,
                    text_row: bool) -> torch.Tensor:
    """The samples' [3, n_i] positions placed at their columns of a padded batch ([3 or 4, rows, width], 0 at
    padding, as the model fills it). text_row: a first row counting each sample's tokens from 0, the layout
    generate() hands the model (it builds the attention mask from that row)."""
    out = torch.zeros(3 + text_row, len(per_sample), width, dtype=torch.long)
    for row, (pos, cols) in enumerate(zip(per_sample, columns)):
        out[text_row:, row, cols] = pos
        if text_row:
            out[0, row, cols] = torch.arange(pos.shape[1])
    return out


VISION_KEYS = ("image_position_ids", "image_cu_seqlens", "image_max_seqlen", "image_window_index",
               "image_cu_window_seqlens", "image_max_window_seqlen")


def vision_indices(grid_thw: torch.Tensor, layout: HostLayout) -> dict:
    """The vision tower's index tensors for these images, under the names its forward takes precomputed
    (`image_` + transformers.vision_utils' keys): per-patch rotary positions, full-attention and window
    boundaries, the window permutation. Each distinct grid is computed once by transformers' own functions
    and the images' results joined with their offsets, as the library's loop over images joins them."""
    positions, windows, cu_windows, patches, merged = [], [], [torch.zeros(1, dtype=torch.int32)], 0, 0
    for t, h, w in grid_thw.tolist():
        pos, index, cu = _one_grid(t, h, w, layout)
        positions.append(pos)
        windows.append(index + merged)
        cu_windows.append(cu[1:] + patches)
        patches += t * h * w
        merged += t * h * w // layout.merge_size ** 2
    from transformers.vision_utils import get_vision_cu_seqlens
    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    cu_window_seqlens = torch.cat(cu_windows)
    return dict(zip(VISION_KEYS, (torch.cat(positions), cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
                                  torch.cat(windows), cu_window_seqlens,
                                  int((cu_window_seqlens[1:] - cu_window_seqlens[:-1]).max()))))


@lru_cache(maxsize=64)
def _one_grid(t: int, h: int, w: int, layout: HostLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
    grid = torch.tensor([[t, h, w]])
    index, cu = get_vision_window_index(grid, layout.merge_size, layout.window_size, layout.patch_size)
    return get_vision_position_ids(grid, layout.merge_size), index, cu


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
