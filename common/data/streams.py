"""Wrappers around a split's sample stream for training: length grouping, and a record of what each worker read.

`open_streams` opens a split for training or evaluation: stage 5's shards (the default) or the chat JSONL encoded
on the fly.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch


class LengthGroupedStream(torch.utils.data.IterableDataset):
    """Batches of similar length from a sample stream, to cut padding: each window of batch_size x
    window_batches samples is sorted by length, cut into batches, and the batches are yielded in a seeded
    random order, sample by sample, so that a DataLoader with the same batch_size takes them whole (each
    worker's stream is grouped on its own). Every sample still comes exactly once per pass; the order is a
    function of the seed, so a resumed run sees the same batches."""

    def __init__(self, inner, batch_size: int, window_batches: int, seed: int):
        self.inner, self.batch_size, self.window_batches, self.seed = inner, batch_size, window_batches, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        window, size = [], self.batch_size * self.window_batches
        for sample in self.inner:
            window.append(sample)
            if len(window) == size:
                yield from self._grouped(window, rng)
                window = []
        yield from self._grouped(window, rng)

    def _grouped(self, window: list, rng) -> list:
        window = sorted(window, key=lambda s: len(s["input_ids"]))
        batches = [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        rng.shuffle(batches)
        return [s for b in batches for s in b]


class RecordingStream(torch.utils.data.IterableDataset):
    """Writes the sample_id (and epoch) of every sample a rank's worker reads to FOLDER/rank{R}-worker{W}.txt, one
    per line (for checking that ranks see disjoint data; prefetched samples are recorded too)."""

    def __init__(self, inner, folder: Path):
        self.inner, self.folder = inner, Path(folder)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        name = f"rank{os.environ.get('RANK', '0')}-worker{info.id if info else 0}.txt"
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / name, "a", encoding="utf-8") as fh:
            for sample in self.inner:
                fh.write(f"{sample['sample_id']}\t{sample.get('epoch', 0)}\n")
                fh.flush()
                yield sample


def shard_location(template: str, work_dir: Path, split: str) -> str:
    """A split's shards: the --shards template with {split} filled in, or stage 5's folder in the work dir."""
    from common import layout
    return template.replace("{split}", split) if template else str(layout.shards_dir(work_dir, split))


def open_stream(source: str, work_dir: Path, split: str, spec, model_path: str, encoding: dict, *,
                training: bool = False, by_rank: bool = True, seed: int = 0, shuffle_buffer: int = 1000,
                skip_corrupt: bool = False, shards: str = ""):
    """A split's samples: stage 5's shards (in the work dir, or where the --shards template points), or (source
    "jsonl") the chat JSONL encoded on the fly. Training streams are shuffled and endless; `by_rank` splits the
    samples over torchrun's ranks (each is read once). Shard samples keep their uint8 pixel patches."""
    from common import layout
    if source == "jsonl":
        from common.data.jsonl_source import JsonlStream
        return JsonlStream(layout.jsonl_path(work_dir, split), model_path, spec, encoding["max_length"],
                           encoding["min_pixels"], encoding["max_pixels"], shuffle=training, seed=seed,
                           infinite=training)
    from common.data.shards import ShardStream
    return ShardStream(shard_location(shards, work_dir, split), spec, shuffle=training, shuffle_buffer=shuffle_buffer,
                       seed=seed, infinite=training, skip_corrupt=skip_corrupt, split_by_rank=by_rank, normalize=False)
