"""Stage 4's work: encode every JSONL row in worker processes, validate it, write its folder."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from common.data.encode import Encoder, ImageSpec, SampleError, validate
from common.errors import PipelineError
from common.data.sample_store import (FINGERPRINT, PIXEL_STORAGE, done_ids, read_fingerprint, remove_sample,
                                      sample_files, write_sample)
from common.fsio import settle_params
from common.workers import map_in_processes

_worker: dict = {}


def _init(model_path: str, max_length: int, min_pixels: int, max_pixels: int, out_dir: str, split: str):
    from common.data.encode import load_tokenizer
    tok = load_tokenizer(model_path)
    spec = ImageSpec.from_model(model_path)
    _worker.update(encoder=Encoder(tok, spec, max_length, min_pixels, max_pixels), spec=spec,
                   out_dir=Path(out_dir), split=split)


def encode_row(enc: Encoder, spec: ImageSpec, row: dict, index: int, split: str) -> tuple[dict, dict, list[str]]:
    """(encoded sample, its metadata, notes) for one JSONL row; image trouble falls back to text only."""
    notes = []
    messages = row["messages"]
    try:
        sample = enc.encode(messages)
    except SampleError as err:
        if err.reason in ("too_long", "image_unreadable", "corrupt_image", "not_image", "bad_image_size",
                          "decompression_bomb", "extreme_aspect_ratio"):
            notes.append(f"image_dropped:{err.reason}")
            messages = [dict(m, content=[c for c in m["content"] if c["type"] != "image"]) for m in messages]
            sample = enc.encode(messages)
        else:
            raise
    validate(sample, spec, enc.image_token_id)
    if sample["catalog_tokens_dropped"]:
        notes.append("truncated")
    has_image = sample["patches"] is not None
    meta = {"sample_id": row["sample_id"], "original_index": index, "split": split,
            "input_ids_shape": list(sample["input_ids"].shape),
            "pixel_values_shape": [int(sample["patches"].shape[0]),
                                   int(sample["patches"].shape[1]) * spec.temporal_patch_size] if has_image else None,
            "pixel_storage": PIXEL_STORAGE if has_image else None,
            "image_grid_thw": sample["image_grid_thw"].tolist() if has_image else None,
            "answer_start": sample["answer_start"], "answer_end": sample["answer_end"],
            "n_image_tokens": sample["n_image_tokens"], "catalog_tokens_dropped": sample["catalog_tokens_dropped"],
            "price": row.get("price"), "image_token_id": enc.image_token_id}
    return sample, meta, notes


MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
               "preprocessor_config.json")


def model_identity(model_path: str) -> str:
    """The tokenizer, chat template and image settings a sample depends on, by content (a copied work folder or
    model folder stays the same model); a hub id stands for itself."""
    folder = Path(model_path)
    if not folder.is_dir():
        return str(model_path)
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()[:16]


def encoding_params(model_path: str, max_length: int, min_pixels: int, max_pixels: int) -> dict:
    """What every sample of a split is encoded with: a folder holds samples of one set of these only."""
    return {"model": model_identity(model_path), "max_length": max_length, "min_pixels": min_pixels,
            "max_pixels": max_pixels}


def _file_identity(path: str) -> list | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def fingerprint(row: dict, index: int, params: dict) -> str:
    """A digest of everything a sample is made from: its JSONL row (text, price, image path) and place (meta.json
    keeps it), its image file's size and mtime (stages 1-2 write a new file when it changes), the options."""
    images = [c["image"] for m in row.get("messages", []) if isinstance(m.get("content"), list)
              for c in m["content"] if isinstance(c, dict) and c.get("type") == "image"]
    text = json.dumps({"row": row, "index": index, "images": [[p, _file_identity(str(p))] for p in images],
                       "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _work(job: tuple[int, dict, str]) -> tuple[str, str, list[str], int]:
    index, row, digest = job
    enc, spec, out_dir = _worker["encoder"], _worker["spec"], _worker["out_dir"]
    try:
        sample, meta, notes = encode_row(enc, spec, row, index, _worker["split"])
    except (SampleError, ValueError) as err:
        remove_sample(out_dir, row["sample_id"])  # an older encoding of another input would be stale
        return row["sample_id"], "failed", [f"{getattr(err, 'reason', 'bad_row')}: {err}"], 0
    files = {**sample_files(sample, meta), FINGERPRINT: digest.encode("ascii")}
    try:
        write_sample(out_dir, row["sample_id"], files)
    except OSError as err:
        raise PipelineError(f"sample {row['sample_id']}: cannot write {out_dir / row['sample_id']}: {err}") from None
    return row["sample_id"], "ok", notes, sum(len(b) for b in files.values())


def preprocess_split(rows: list[dict], out_dir: Path, split: str, model_path: str, max_length: int,
                     min_pixels: int, max_pixels: int, workers: int, part=None, force: bool = False) -> dict:
    """Encode the rows (of `part` only, when given; each keeps its index in the whole JSONL). A finished sample is
    skipped only when its fingerprint (row, image file, options) is unchanged; other options need `force`."""
    from common.data.parts import Part
    part = part or Part()
    params = encoding_params(model_path, max_length, min_pixels, max_pixels)
    settle_params(out_dir, params, force, "encoded")  # --force redoes every sample: options are in each fingerprint
    have = done_ids(out_dir)
    mine = [(i, r, fingerprint(r, i, params)) for i, r in enumerate(rows) if part.has(r["sample_id"])]
    jobs = [(i, r, fp) for i, r, fp in mine
            if r["sample_id"] not in have or read_fingerprint(out_dir, r["sample_id"]) != fp]
    changed = sum(1 for _, r, _ in jobs if r["sample_id"] in have)
    counts, notes_count, failures, nbytes = Counter(skipped=len(mine) - len(jobs)), Counter(), defaultdict(list), 0
    init_args = (model_path, max_length, min_pixels, max_pixels, str(out_dir), split)
    results = map_in_processes(_work, jobs, workers, _init, init_args, chunksize=32)
    for sid, status, notes, size in tqdm(results, total=len(jobs), desc=f"preprocess {split}",
                                         unit="sample", mininterval=1):
        counts[status] += 1
        nbytes += size
        for note in notes:
            if status == "failed":
                failures[note.split(":")[0]].append(sid)
            else:
                notes_count[note] += 1
                if note.startswith("image_dropped"):
                    failures[note].append(sid)
    return {"counts": dict(counts), "notes": dict(notes_count), "problem_ids": dict(failures),
            "redone_changed": changed,
            "bytes_written": nbytes, "workers": workers or os.cpu_count()}
