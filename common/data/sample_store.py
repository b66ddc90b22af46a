"""Stage 4's per-sample folders: `input_ids.npy, attention_mask.npy, pixel_values.npy, meta.json`.

Stage 5 packs the same bytes into shards, where the metadata member is named `metadata.json` (the seed's
key). Text-only samples have no `pixel_values.npy`.

`pixel_values.npy` holds the uint8 patches (`meta["pixel_storage"] == "uint8_patches"`); readers call
`common.data.encode.normalize_patches` to get the processor's float32 values back. Each folder is written
under a temporary name and renamed, so a folder that exists is complete. Its `fingerprint.txt` (not a member,
never packed) names what it was encoded from, so that a rerun redoes a sample whose input changed.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

PIXEL_STORAGE = "uint8_patches"
MEMBERS = ("input_ids.npy", "attention_mask.npy", "pixel_values.npy", "meta.json")
FINGERPRINT = "fingerprint.txt"  # what the sample was encoded from (not a member: shards never carry it)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def sample_files(encoded: dict, meta: dict) -> dict[str, bytes]:
    """The member files of one sample, as bytes: the same in stage 4's folders and in stage 5's shards."""
    ids = encoded["input_ids"]
    files = {"input_ids.npy": npy_bytes(ids),
             "attention_mask.npy": npy_bytes(np.ones_like(ids, dtype=np.uint8)),
             "meta.json": json.dumps(meta, sort_keys=True).encode()}
    if encoded["patches"] is not None:
        files["pixel_values.npy"] = npy_bytes(encoded["patches"])
    return files


def write_sample(out_dir: Path, sample_id: str, files: dict[str, bytes]) -> None:
    final = out_dir / sample_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{sample_id}.", suffix=".tmp", dir=out_dir))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def done_ids(out_dir: Path) -> set[str]:
    if not out_dir.is_dir():
        return set()
    return {n for n in os.listdir(out_dir) if not n.startswith(".") and (out_dir / n / "meta.json").exists()}


def read_fingerprint(out_dir: Path, sample_id: str) -> str | None:
    """The input fingerprint a finished sample was written with; None for one written before they were kept."""
    try:
        return (out_dir / sample_id / FINGERPRINT).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def remove_sample(out_dir: Path, sample_id: str) -> None:
    """Drop a finished sample whose input changed and can no longer be encoded: a stale copy must not stay."""
    if (out_dir / sample_id).is_dir():
        shutil.rmtree(out_dir / sample_id)


def clean_partial(out_dir: Path, owned=lambda sample_id: True) -> int:
    """Remove the folders a killed run left half-written (those of samples `owned` says are this run's)."""
    n = 0
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and owned(p.name[1:].rsplit(".", 2)[0]):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                n += 1
    return n


def read_sample_files(out_dir: Path, sample_id: str) -> dict[str, bytes]:
    folder = out_dir / sample_id
    return {name: (folder / name).read_bytes() for name in MEMBERS if (folder / name).exists()}
