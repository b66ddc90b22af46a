"""WebDataset shards: writing them (stage 5), and the one reader that training and inference share.

Layout: `webdataset_{split}/{split}-shard-NNNNNN.tar` plus `index.json` (shards, sample counts). In a
shard each sample has the members `input_ids.npy, attention_mask.npy, pixel_values.npy` (absent for
text-only samples) and `metadata.json`, under a dot-free key (the row's index in the JSONL), since
WebDataset cuts keys at the first dot and a sample_id may hold one.

Reading splits the work into slots (rank x dataloader worker). With at least as many shards as slots,
each slot reads whole shards; with fewer, every slot reads all shards and keeps every n-th sample.
Either way each sample is read exactly once per epoch across all ranks and workers.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from common.data.encode import ImageSpec, normalize_patches
from common.data.shard_source import INDEX, Shard, ShardError, iter_remote_shard, open_source
from common.fsio import atomic_path, read_json, write_json

log = logging.getLogger("shards")
MEMBER_MAP = {"input_ids.npy": "input_ids.npy", "attention_mask.npy": "attention_mask.npy",
              "pixel_values.npy": "pixel_values.npy", "meta.json": "metadata.json"}


def sample_key(index: int) -> str:
    return f"s{index:09d}"


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> int:
    """Write (key, {member: bytes}) samples to path atomically, with fixed metadata so bytes repeat."""
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, files in samples:
                for name in sorted(files):
                    info = tarfile.TarInfo(f"{key}.{MEMBER_MAP.get(name, name)}")
                    info.size = len(files[name])
                    info.mtime = 0
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(files[name]))
    return path.stat().st_size


def verify_tar(path: Path, expected_keys: list[str]) -> None:
    """Round-trip check: the shard reads back with exactly the expected samples, each with its metadata."""
    found = [s["__key__"] for s in iter_shard(path)]
    if found != expected_keys:
        raise ShardError(f"{path}: round-trip check failed: {len(found)} samples read, {len(expected_keys)} written")


def load_index(folder: Path) -> dict:
    return open_source(str(folder)).index


def save_index(folder: Path, index: dict) -> None:
    write_json(Path(folder) / INDEX, index)


def size_problem(path: Path, expected: int | None) -> str | None:
    """Why the shard at path is not the one index.json describes (missing, or another size), else None.

    A tar cut at a member boundary reads back as a valid, shorter archive, so reading alone cannot tell.
    """
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"missing shard {path}: {err}"
    if expected is not None and size != expected:
        return f"corrupt or truncated shard {path}: {size} bytes, {INDEX} says {expected}"
    return None


def iter_shard(path: Path):
    """Raw WebDataset samples of one shard: dicts of member bytes with `__key__` and `__url__`."""
    from webdataset.tariterators import group_by_keys, tar_file_expander
    try:
        with open(path, "rb") as stream:
            yield from group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))
    except (tarfile.TarError, OSError, ValueError) as err:
        raise ShardError(f"corrupt or truncated shard {path}: {err}") from None


def decode(raw: dict, spec: ImageSpec, normalize: bool = True) -> dict:
    """Shard sample -> model-ready sample (np.load from bytes, grid checked). pixel_values are the processor's
    float32 values, or with normalize=False the stored uint8 patches for normalize_patches_torch."""
    where = f"{raw.get('__url__')} sample {raw.get('__key__')}"
    try:
        meta = json.loads(raw["metadata.json"])
        ids = np.load(io.BytesIO(raw["input_ids.npy"]), allow_pickle=False)
        pixels = grid = None
        if "pixel_values.npy" in raw:
            patches = np.load(io.BytesIO(raw["pixel_values.npy"]), allow_pickle=False)
            grid = np.asarray(meta["image_grid_thw"], dtype=np.int64)
            if patches.shape[0] != int(grid.prod()):
                raise ValueError(f"{patches.shape[0]} patches but grid {grid.tolist()}")
            if int((ids == meta["image_token_id"]).sum()) * spec.merge_size ** 2 != patches.shape[0]:
                raise ValueError("image token count does not match the patches")
            pixels = torch.from_numpy(normalize_patches(patches, spec) if normalize else patches)
            grid = torch.from_numpy(grid)
    except (KeyError, ValueError, json.JSONDecodeError) as err:
        raise ShardError(f"bad sample in {where}: {err}") from None
    return {"input_ids": torch.from_numpy(ids.astype(np.int64)), "pixel_values": pixels, "image_grid_thw": grid,
            "answer_start": meta.get("answer_start"), "answer_end": meta.get("answer_end"),
            "sample_id": meta["sample_id"], "price": meta.get("price"), "original_index": meta["original_index"]}


def _my_share(shards: list, split_by_rank: bool):
    """(the shards this rank's worker reads, keep() -> whether to yield each sample read, in order).

    Shards are dealt to ranks first, then among the rank's workers: ranks then differ by at most one shard.
    Dealt by (rank, worker) slot, the low ranks got up to one shard per worker more (75 shards over 8 GPUs x 2
    workers: 10 shards on ranks 0-4, 8 on ranks 6-7), and the slowest rank sets the pace. Where a level has
    fewer shards than takers, its takers read them all and keep every n-th sample instead."""
    rank, world = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))) if split_by_rank else (0, 1)
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    filters = []
    for me, takers in ((rank, world), (worker, workers)):
        if len(shards) >= takers:
            shards = shards[me::takers]
        else:
            filters.append((me, takers))
    seen = [0] * len(filters)

    def keep() -> bool:
        for k, (me, takers) in enumerate(filters):  # each level counts only what the level above kept
            seen[k] += 1
            if (seen[k] - 1) % takers != me:
                return False
        return True
    return shards, keep


def _slot(split_by_rank: bool = True) -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not split_by_rank:
        rank, world = 0, 1
    info = get_worker_info()
    wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
    return rank * nworkers + wid, world * nworkers


class ShardStream(IterableDataset):
    """Streams decoded samples of one split to this rank and dataloader worker.

    source: a local folder, a folder URL, a brace pattern or a pipe: command (common.data.shard_source).
    shuffle: shard order and a buffer of `shuffle_buffer` samples, reseeded per epoch.
    infinite: epochs follow each other forever (training plans its steps from the index instead).
    normalize: False keeps the uint8 patches (stages 6 and 7 normalize them on the device).
    skip_corrupt: an unreadable shard is read up to where it breaks, a bad sample is left out alone; each is
    logged and listed in `corrupt` (this process's), instead of raising.
    """

    def __init__(self, source: Path | str, spec: ImageSpec, shuffle: bool = False, shuffle_buffer: int = 1000,
                 seed: int = 0, infinite: bool = False, skip_corrupt: bool = False, split_by_rank: bool = True,
                 normalize: bool = True):
        self.source = open_source(str(source))
        self.index, self.shards = self.source.index, self.source.shards
        self.spec, self.shuffle, self.buffer, self.seed = spec, shuffle, shuffle_buffer, seed
        self.infinite, self.skip_corrupt, self.split_by_rank = infinite, skip_corrupt, split_by_rank
        self.corrupt: list[str] = []
        self.normalize = normalize

    @property
    def num_samples(self) -> int:
        """Samples in one epoch, from the index (no `__len__`: a stream's length would be a guess)."""
        return self.index["samples"]

    def _raw(self, shard: Shard):
        """The shard's raw samples, checked against the index: its size (local) and its sample count (a tar cut
        at a member boundary reads back as a valid, shorter archive)."""
        if shard.local:
            problem = size_problem(Path(shard.url), shard.bytes)
            if problem and not self.skip_corrupt:
                raise ShardError(problem)
            # under skip_corrupt the samples before the damage are still read; reading stops where it breaks
        count = 0
        for raw in iter_shard(Path(shard.url)) if shard.local else iter_remote_shard(shard.url):
            count += 1
            yield raw
        if count < shard.samples:
            raise ShardError(f"corrupt or truncated shard {shard.url}: {count} samples, {INDEX} says {shard.samples}")

    def _epoch(self, epoch: int):
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(shards)
        mine, keep = _my_share(shards, self.split_by_rank)
        for shard in mine:
            if shard.local and not Path(shard.url).exists() and self.skip_corrupt:
                self.corrupt.append(shard.url)
                log.warning("missing shard %s skipped", shard.url)
                continue
            try:
                for raw in self._raw(shard):
                    if keep():
                        sample = self._decoded(raw)
                        if sample is not None:
                            yield sample
            except ShardError as err:
                if not self.skip_corrupt:
                    raise
                self.corrupt.append(shard.url)
                log.warning("%s (skipped: --skip-corrupt-shards)", err)

    def _decoded(self, raw: dict) -> dict | None:
        """The sample, or None for a bad one under skip_corrupt. Only the bad sample goes: were the rest of its
        shard dropped, this reader's count of the shard's samples would fall behind the count of the shard's
        other readers (where samples, not shards, are dealt), and they would then read some samples twice."""
        try:
            return decode(raw, self.spec, self.normalize)
        except ShardError as err:
            if not self.skip_corrupt:
                raise
            self.corrupt.append(str(err))
            log.warning("%s (skipped: --skip-corrupt-shards)", err)
            return None

    def _shuffled(self, samples, epoch: int):
        slot, _ = _slot(self.split_by_rank)
        rng = random.Random((self.seed + 1) * 1_000_003 + epoch * 997 + slot)
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        epoch = 0
        while True:
            samples = ({**s, "epoch": epoch} for s in self._epoch(epoch))
            yield from (self._shuffled(samples, epoch) if self.shuffle else samples)
            epoch += 1
            if not self.infinite:
                return


class IndexableWebDataset(Dataset):
    """Map-style view of a shard folder for trainers that need `__len__` / `__getitem__`.

    Built from the tar headers (one pass, no payload read); an item is read with one seek per member.
    """

    def __init__(self, folder: Path, spec: ImageSpec):
        self.folder, self.spec = Path(folder), spec
        self.index = load_index(self.folder)
        self.items: list[tuple[Path, str, dict[str, tuple[int, int]]]] = []
        for shard in self.index["shards"]:
            path = self.folder / shard["name"]
            members: dict[str, dict[str, tuple[int, int]]] = {}
            problem = size_problem(path, shard.get("bytes"))
            if problem:
                raise ShardError(problem)
            try:
                with tarfile.open(path, "r:") as tar:
                    for m in tar:
                        key, _, ext = m.name.partition(".")
                        members.setdefault(key, {})[ext] = (m.offset_data, m.size)
            except (tarfile.TarError, OSError) as err:
                raise ShardError(f"corrupt or truncated shard {path}: {err}") from None
            self.items.extend((path, key, exts) for key, exts in members.items())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, key, exts = self.items[i]
        raw = {"__key__": key, "__url__": str(path)}
        with open(path, "rb") as fh:
            for ext, (offset, size) in exts.items():
                fh.seek(offset)
                raw[ext] = fh.read(size)
        return decode(raw, self.spec)


def token_summary(lengths: list[int]) -> dict:
    """Tokens per sample (mean, 95th percentile, max): what the GPU plan sizes batches by."""
    if not lengths:
        return {"mean": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    return {"mean": round(sum(ordered) / len(ordered), 1), "p95": ordered[int(0.95 * (len(ordered) - 1))],
            "max": ordered[-1]}


def planning_tokens(index: dict, default: int = 640) -> tuple[int, int, int]:
    """(95th percentile, mean, longest) of a split's sample lengths: what a plan sizes batches (memory) and times
    steps by; `default` for an index written before stage 5 recorded lengths."""
    tokens = index.get("tokens", {})
    p95 = int(tokens.get("p95") or default)
    return p95, int(tokens.get("mean") or default), int(tokens.get("max") or p95)


def pack_split(rows: list[dict], pre_dir: Path, out_dir: Path, split: str, per_shard: int, part=None) -> dict:
    """Pack stage 4's sample folders into shards in JSONL order (the rows of `part` only, into its own shards and
    index.part-I-of-N.json); skip shards already complete whose samples stage 4 has not redone since."""
    from tqdm import tqdm

    from common.data.parts import Part
    from common.data.sample_store import done_ids, read_sample_files
    part = part or Part()
    prefix = f"{split}{part.suffix.replace('.', '-')}-shard-"
    index_path = out_dir / f"index{part.suffix}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.glob(f".{prefix}*.tmp*"):
        p.unlink()
    have = done_ids(pre_dir)
    mine = [(i, r["sample_id"]) for i, r in enumerate(rows) if part.has(r["sample_id"])]
    present = [(i, sid) for i, sid in mine if sid in have]
    missing = [sid for _, sid in mine if sid not in have]
    chunks = [present[k:k + per_shard] for k in range(0, len(present), per_shard)]
    old = _previous_index(index_path)
    old_shards = {s["name"]: s for s in old["shards"]} if old and old.get("samples_per_shard") == per_shard else {}
    if old and not old_shards:  # a different layout: start over rather than mix two
        for p in out_dir.glob(f"{prefix}*.tar"):
            p.unlink()
    shards, written, reused = [], 0, 0
    for k, chunk in enumerate(tqdm(chunks, desc=f"convert {split}", unit="shard", mininterval=1)):
        name = f"{prefix}{k:06d}.tar"
        keys = [sample_key(i) for i, _ in chunk]
        ids = [sid for _, sid in chunk]
        prev = old_shards.get(name)
        inputs = _inputs_digest(pre_dir, ids)
        if prev and prev["sample_ids"] == ids and prev.get("inputs") == inputs and \
                size_problem(out_dir / name, prev.get("bytes")) is None:
            shards.append({**prev, "sample_tokens": prev.get("sample_tokens") or
                           [json.loads((pre_dir / sid / "meta.json").read_text())["input_ids_shape"][0] for sid in ids]})
            reused += 1
            continue
        samples = [(key, read_sample_files(pre_dir, sid)) for key, (_, sid) in zip(keys, chunk)]
        size = write_tar(out_dir / name, samples)
        verify_tar(out_dir / name, keys)
        tokens = [json.loads(files["meta.json"])["input_ids_shape"][0] for _, files in samples]
        shards.append({"name": name, "samples": len(chunk), "bytes": size, "sample_ids": ids, "sample_tokens": tokens,
                       "inputs": inputs})
        written += 1
    for p in out_dir.glob(f"{prefix}*.tar"):  # shards of an earlier, longer run
        if p.name not in {s["name"] for s in shards}:
            p.unlink()
    index = {"split": split, "samples": len(present), "samples_per_shard": per_shard, "shards": shards,
             "tokens": token_summary([t for s in shards for t in s["sample_tokens"]])}
    write_json(index_path, index)
    return {"samples": len(present), "shards": len(shards), "shards_written": written, "shards_reused": reused,
            "missing_from_stage4": len(missing), "missing_ids": missing,
            "bytes": sum(s["bytes"] for s in shards)}


def _inputs_digest(pre_dir: Path, ids: list[str]) -> str:
    """A digest of what the shard's samples were encoded from (stage 4's fingerprints): a sample stage 4 redid
    because its row or image changed makes its shard be packed again, though its ids are the same."""
    import hashlib

    from common.data.sample_store import read_fingerprint
    text = "\n".join(f"{sid} {read_fingerprint(pre_dir, sid)}" for sid in ids)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _previous_index(index_path: Path) -> dict | None:
    """The index a previous run wrote, to reuse its shards; a damaged one means starting the split over."""
    from common.errors import PipelineError
    if not index_path.exists():
        return None
    try:
        return read_json(index_path)
    except PipelineError as err:
        log.warning("%s; its shards are written again", err)
        return {"shards": []}


def merge_part_indexes(out_dir: Path, split: str, count: int) -> dict:
    """index.json from the N parts' indexes (all N must be there): the shards of part 0, then part 1, ..."""
    paths = [out_dir / f"index.part-{i}-of-{count}.json" for i in range(count)]
    absent = [p.name for p in paths if not p.exists()]
    if absent:
        raise ShardError(f"{out_dir}: {', '.join(absent)} not there yet: run 5_convert.py --part I/{count} for each")
    parts = [read_json(p) for p in paths]
    shards = [s for part in parts for s in part["shards"]]
    index = {"split": split, "samples": sum(p["samples"] for p in parts), "samples_per_shard":
             parts[0]["samples_per_shard"], "parts": count, "shards": shards,
             "tokens": token_summary([t for s in shards for t in s["sample_tokens"]])}
    save_index(out_dir, index)
    return {"samples": index["samples"], "shards": len(shards), "parts": count}
