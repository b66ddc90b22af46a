"""The lean path: samples straight from the chat JSONL, encoded on the fly by stage 4's own code.

For quick experiments and as the baseline that the shard path is measured against. Rows are split over
ranks and dataloader workers like the shard reader does, so each is read once per epoch.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from common.data.chat_jsonl import read_jsonl
from common.data.encode import Encoder, ImageSpec, normalize_patches
from common.data.shards import _slot


class JsonlStream(IterableDataset):
    def __init__(self, path: Path, model_path: str, spec: ImageSpec, max_length: int, min_pixels: int,
                 max_pixels: int, shuffle: bool = False, seed: int = 0, infinite: bool = False):
        self.rows = read_jsonl(path)
        self.model_path, self.spec = model_path, spec
        self.max_length, self.min_pixels, self.max_pixels = max_length, min_pixels, max_pixels
        self.shuffle, self.seed, self.infinite = shuffle, seed, infinite
        self.num_samples = len(self.rows)

    def __iter__(self):
        from common.data.encode import load_tokenizer
        from common.data.preprocess import encode_row
        enc = Encoder(load_tokenizer(self.model_path), self.spec, self.max_length, self.min_pixels, self.max_pixels)
        slot, nslots = _slot()
        epoch = 0
        while True:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            for i in order[slot::nslots]:
                sample, meta, _ = encode_row(enc, self.spec, self.rows[i], i, "")
                has_image = sample["patches"] is not None
                yield {"input_ids": torch.from_numpy(sample["input_ids"].astype(np.int64)),
                       "pixel_values": torch.from_numpy(normalize_patches(sample["patches"], self.spec))
                       if has_image else None,
                       "image_grid_thw": torch.from_numpy(sample["image_grid_thw"]) if has_image else None,
                       "answer_start": sample["answer_start"], "answer_end": sample["answer_end"],
                       "sample_id": meta["sample_id"], "price": meta["price"], "original_index": i}
            epoch += 1
            if not self.infinite:
                return
