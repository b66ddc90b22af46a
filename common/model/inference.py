"""Streaming batched inference that survives kills: predictions go to part files as batches finish.

Batches are fixed groups of the rank's sample stream (optionally length-sorted inside a fixed window),
so a rerun skips exactly the batches already written and computes the rest with the same padding as an
uninterrupted run would: the final file is the same either way. Three kinds of prediction share the loop: prices
written as text (generation), prices from the regression head (one forward), and embeddings (the pooled vectors,
for stacking); prices go to CSV parts, embeddings to .npz parts.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import queue
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.fsio import write_text
from common.model.report import price_text
from common.model.predict import predict_batch, prepare_batch

log = logging.getLogger("infer")
PART_FIELDS = ["sample_id", "price", "status"]


def read_parts(parts_dir: Path, pattern: str = "part-*") -> dict[str, tuple[float | None, str]]:
    """sample_id -> (price or None, status) from every finished part file (matching `pattern`)."""
    done = {}
    if parts_dir.is_dir():
        for p in sorted(parts_dir.glob(pattern + ".csv")):
            with open(p, newline="", encoding="utf-8") as fh:
                for r in csv.DictReader(fh):
                    done[r["sample_id"]] = (float(r["price"]) if r["price"] else None, r["status"])
    return done


def _write_part(parts_dir: Path, rank: int, seq: int, rows: list[tuple[str, float | None, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PART_FIELDS)
    for sid, price, status in rows:
        w.writerow([sid, "" if price is None else repr(float(price)), status])
    write_text(parts_dir / f"part-r{rank:03d}-{seq:07d}-{time.time_ns()}.csv", buf.getvalue())


def read_vector_parts(parts_dir: Path, pattern: str = "part-*") -> dict[str, "np.ndarray"]:
    """sample_id -> embedding from every finished .npz part (matching `pattern`)."""
    import numpy as np
    done = {}
    if parts_dir.is_dir():
        for p in sorted(parts_dir.glob(pattern + ".npz")):
            with np.load(p, allow_pickle=False) as part:
                done.update(zip(part["ids"].tolist(), part["vectors"]))
    return done


def _write_vector_part(parts_dir: Path, rank: int, seq: int, rows: list) -> None:
    import numpy as np

    from common.fsio import atomic_path
    with atomic_path(parts_dir / f"part-r{rank:03d}-{seq:07d}-{time.time_ns()}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.array([sid for sid, _ in rows]), vectors=np.stack([v for _, v in rows]))


def _windows(stream, batch_size: int, window_batches: int, sort_by_length: bool):
    """Fixed batches of the stream: windows of batch_size*window_batches samples, sorted by length inside."""
    window = []
    for sample in stream:
        window.append(sample)
        if len(window) == batch_size * window_batches:
            yield from _split(window, batch_size, sort_by_length)
            window = []
    if window:
        yield from _split(window, batch_size, sort_by_length)


def _split(window, batch_size, sort_by_length):
    if sort_by_length:
        window = sorted(window, key=lambda s: (len(s["input_ids"]), s["original_index"]))
    for k in range(0, len(window), batch_size):
        yield window[k:k + batch_size]


def _not_done(batches, done: dict):
    """(batch, whether it still needs predicting) for each batch."""
    for batch in batches:
        yield batch, not all(s["sample_id"] in done for s in batch)


def _prepared_ahead(batches, prepare, depth: int = 2):
    """(batch, prepare(batch) or None if it is already done), made by a thread that runs up to `depth` batches
    ahead of the caller: it pulls the stream, sorts each window and collates, while the GPU works.
    Collating and the host position ids held the GPU idle for ~100 ms of each batch of 64 when done in line
    (profiled, bench/gpu_runs/h100-n.json); preparing only the next batch still left the start of each
    length-sorting window (a whole window pulled from the loader at once) on the caller. An error in the
    thread is raised in the caller; the thread stops when the caller stops."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch, needed in batches:
                if not put((batch, prepare(batch) if needed else None)):
                    return
            put(_END)
        except BaseException as err:  # handed to the caller, which raises it
            put(err)

    thread = threading.Thread(target=produce, name="prepare-batches", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)
        if thread.is_alive():
            log.warning("the batch-preparing thread did not stop within 30 s (a loader read still pending)")


_END = object()


def _fitting(predict, prepare, samples: list, prepared) -> tuple[list, int]:
    """predict(prepared); a batch that runs out of GPU memory is predicted in two halves instead (counted)."""
    try:
        return predict(prepared), 0
    except torch.OutOfMemoryError:
        if len(samples) == 1:
            raise
    torch.cuda.empty_cache()
    half = len(samples) // 2
    first, n1 = _fitting(predict, prepare, samples[:half], prepare(samples[:half]))
    second, n2 = _fitting(predict, prepare, samples[half:], prepare(samples[half:]))
    return first + second, 1 + n1 + n2


def run_predictions(predict, dataset, collator, parts_dir: Path, rank: int, batch_size: int, workers: int,
                    sort_by_length: bool, window_batches: int, flush_every: int, expected: int | None = None,
                    vectors: bool = False) -> dict:
    """Stream the rank's samples in fixed batches; predict(prepared batch) -> one price (or None), or with `vectors`
    one embedding, a sample; write part files as batches finish, skipping batches a part already holds."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    # Only this rank's parts: another rank's (or a run with another world size) hold other batches.
    read = read_vector_parts if vectors else read_parts
    done = read(parts_dir, f"part-r{rank:03d}-*")
    write = _write_vector_part if vectors else _write_part
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        prefetch_factor=16 if workers else None, pin_memory=torch.cuda.is_available())
    pending, seq, computed, skipped, splits = [], len(list(parts_dir.glob(f"part-r{rank:03d}-*"))), 0, 0, 0
    started, steady = time.time(), None
    total = math.ceil(expected / batch_size) if expected else None
    todo = _not_done(_windows(loader, batch_size, window_batches, sort_by_length), done)

    def prepare(samples):
        return prepare_batch(collator(samples))

    for batch, prepared in tqdm(_prepared_ahead(todo, prepare), total=total, desc=f"infer rank {rank}",
                                unit="batch", mininterval=2, disable=rank != 0):
        if prepared is None:
            skipped += len(batch)
            continue
        outputs, split = _fitting(predict, prepare, batch, prepared)
        splits += split
        pending += [(s["sample_id"], out) if vectors else
                    (s["sample_id"], out, "ok" if out is not None else "unparsable") for s, out in zip(batch, outputs)]
        computed += len(batch)
        if computed == 2 * batch_size:  # the first batches compile: the steady rate starts after them
            steady = (_synchronized_time(), computed)
        if len(pending) >= flush_every * batch_size:
            write(parts_dir, rank, seq, pending)
            seq, pending = seq + 1, []
    if pending:
        write(parts_dir, rank, seq, pending)
    seconds, end = time.time() - started, _synchronized_time()
    return {"computed": computed, "skipped_done": skipped, "seconds": round(seconds, 2), "oom_splits": splits,
            "samples_per_s": round(computed / seconds, 2) if seconds else None,
            "steady_samples_per_s": round((computed - steady[1]) / (end - steady[0]), 2)
            if steady and computed > steady[1] else None,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


def _synchronized_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "price_head.safetensors",
                 "head_config.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def prediction_fingerprint(base: str, adapter: str | None, objective: str, settings: dict, index: dict,
                           source_file: Path | None = None) -> dict:
    """Everything that decides what a part file holds: the model (base, and the adapter's and head's files by
    sha256), the samples (the shard index, or the JSONL's sha256 when encoding on the fly) and `settings` (options
    that change outputs or batch boundaries). sha256 rather than size + mtime: a retrain with the same LoRA rank
    writes files of the same size, copies (cp -p, rsync -a) keep mtimes, and a LoRA adapter of the 3B model
    (tens of MB) hashes in well under a second, next to tens of seconds of loading the model."""
    files = {name: _sha256(Path(adapter) / name) for name in ADAPTER_FILES
             if adapter and (Path(adapter) / name).is_file()}
    samples = (hashlib.sha256(json.dumps(index, sort_keys=True, default=str).encode()).hexdigest() if index
               else _sha256(source_file) if source_file and source_file.is_file() else None)
    fingerprint = {"base_model": base, "adapter": adapter, "adapter_files": files, "objective": objective,
                   "samples": samples, **settings}
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))  # as it reads back from run-*.json


def _changes(old: dict | None, new: dict) -> str:
    if old is None:
        return "the parts have no fingerprint (written before it was recorded, or by another tool)"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def claim_parts(parts_dir: Path, rank: int, world: int, fingerprint: dict) -> str | None:
    """Keep this rank's part files only if its run-rNNN.json records the same fingerprint; else delete them (a
    cache: they would answer rows with another model's or another batching's predictions) and record the new one.
    Returns what changed, or None. Each rank checks and clears only its own files, so ranks never race on a file
    and nodes that do not share the folder work alike; one process alone (whose merge reads every part in the
    folder) clears every rank's."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    marker = parts_dir / f"run-r{rank:03d}.json"
    try:
        old = json.loads(marker.read_text(encoding="utf-8")) if marker.exists() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = {"damaged": str(marker)}
    mine = list(parts_dir.glob("part-*" if world == 1 else f"part-r{rank:03d}-*"))
    if world == 1:
        mine += [p for p in parts_dir.glob("run-r*.json") if p != marker]
    if old == fingerprint:
        return None
    changed = _changes(old, fingerprint) if (old is not None or mine) else None
    if changed:
        log.warning("%s: not resuming from %d part files of another run (%s); predicting afresh",
                    parts_dir, len(mine), changed)
    for p in mine:
        p.unlink()
    from common.fsio import write_json
    write_json(marker, fingerprint)
    return changed


def text_predictor(model, tokenizer, constrained: bool, spec, decoder=None):
    """predict(batch) for a model that writes the price as text: greedy, constrained to a number."""
    def predict(batch):
        return predict_batch(model, tokenizer, batch, constrain=constrained, spec=spec, decoder=decoder)
    return predict


def _pooled_hidden(model, batch: dict, spec) -> torch.Tensor:
    """The final hidden state at each row's last prompt token, for a batch of the pooled collator: one forward of
    the language model without its head (the peft model's, or the merged one's)."""
    from common.model.head import LAST_POSITIONS, PRICE_TARGETS, pooled
    from common.model.predict import with_normalized_pixels
    device = next(model.parameters()).device
    inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
              if k != PRICE_TARGETS}
    inputs = with_normalized_pixels(inputs, spec)
    last = inputs.pop(LAST_POSITIONS)
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return pooled(core.model(**inputs, use_cache=False).last_hidden_state, last)


def regression_predictor(model, head, price_floor: float, spec):
    """predict(batch) with the price head: one forward a batch, no decoding; expm1, clamped to the floor."""
    from common.model.head import to_prices

    @torch.no_grad()
    def predict(batch):
        return to_prices(head(_pooled_hidden(model, batch, spec)), price_floor)
    return predict


def embedding_predictor(model, spec):
    """predict(batch) -> each row's pooled float32 vector (the head's input), for stacking."""
    @torch.no_grad()
    def predict(batch):
        return list(_pooled_hidden(model, batch, spec).float().cpu().numpy())
    return predict


def gathered_parts(parts_dir: Path, rank: int, vectors: bool) -> dict:
    """Every rank's predictions on rank 0 (others get {}), read by each rank from its own part files: nodes need
    not share the folder. One node or one rank: the folder's parts as they are."""
    import torch.distributed as dist
    read = read_vector_parts if vectors else read_parts
    if not dist.is_initialized():
        return read(parts_dir)
    mine = read(parts_dir, f"part-r{rank:03d}-*")
    everyone = [None] * dist.get_world_size()
    dist.gather_object(mine, everyone if rank == 0 else None, dst=0)
    return {k: v for part in everyone for k, v in part.items()} if rank == 0 else {}


def merge(expected_ids: list[str], predictions: dict[str, tuple[float | None, str]], fallback: float,
          known: set | None = None):
    """One (sample_id, price, reason) per expected id, in order; anything missing or odd gets the fallback.
    `known`: the ids the samples hold (the shard index's): a missing id outside it is `not_in_shards` (test.csv
    changed after stage 5, or stage 4 left the row out), one inside it `no_sample` (its shard unread)."""
    if not (isinstance(fallback, (int, float)) and math.isfinite(fallback) and fallback > 0):
        from common.errors import PipelineError
        raise PipelineError(f"the training median price {fallback!r} is not a positive price: rerun 3_create_jsonl.py")
    rows, reasons = [], {}
    for sid in expected_ids:
        missing = "not_in_shards" if known is not None and sid not in known else "no_sample"
        price, status = predictions.get(sid, (None, missing))
        reason = "ok"
        if status != "ok":
            reason = status
        elif price is None or not math.isfinite(price) or price <= 0:
            reason = "non_positive_or_nan"
        if reason != "ok":
            price = fallback
            reasons.setdefault(reason, []).append(sid)
        rows.append((sid, float(price), reason))
    return rows, reasons


def write_embeddings(folder: Path, split: str, expected_ids: list[str], vectors: dict) -> dict:
    """FOLDER/{split}.npy (float32, one row per expected id, in their order; NaN where an id has no sample) and
    FOLDER/{split}_ids.csv (the sample_ids, in the same order)."""
    import numpy as np

    from common.fsio import atomic_path
    width = next(iter(vectors.values())).shape[0] if vectors else 0
    table = np.full((len(expected_ids), width), np.nan, dtype=np.float32)
    missing = []
    for row, sid in enumerate(expected_ids):
        if sid in vectors:
            table[row] = vectors[sid]
        else:
            missing.append(sid)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{split}.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, table)
    write_text(folder / f"{split}_ids.csv", "sample_id\n" + "".join(f"{sid}\n" for sid in expected_ids))
    return {"rows": len(expected_ids), "width": width, "missing_ids": missing}


def write_predictions_csv(path: Path, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["sample_id", "price"])
    for sid, price, _ in rows:
        w.writerow([sid, price_text(price)])
    write_text(path, buf.getvalue())


def indexed_ids(index: dict) -> set | None:
    """Every sample_id the shard index lists, or None where there is no index (samples encoded on the fly)."""
    shards = index.get("shards") if index else None
    if not shards or any("sample_ids" not in s for s in shards):
        return None
    return {sid for s in shards for sid in s["sample_ids"]}


def fallback_warning(split: str, total: int, reasons: dict[str, list[str]], median: float, index: dict,
                     stats_path: Path) -> str | None:
    """The line stage 7 ends with when rows got the median: how many, why, the first ids, the shards not read."""
    n = sum(len(v) for v in reasons.values())
    if not n:
        return None
    counts = ", ".join(f"{k} {len(v)}" for k, v in sorted(reasons.items()))
    first = "; ".join(f"{', '.join(reasons[k][:3])}{', ...' if len(reasons[k]) > 3 else ''} ({k})"
                      for k in sorted(reasons))  # a few of each reason: one reason's many would hide the others
    unread = set(reasons.get("no_sample", []))
    shards = sorted({s["name"] for s in (index or {}).get("shards", []) if unread & set(s.get("sample_ids", []))})
    where = f"; shards broken or missing: {', '.join(shards[:5])}{' ...' if len(shards) > 5 else ''}" if shards else ""
    return (f"{n} of {total} {split} ids had no prediction (reasons: {counts}; first ids: {first}{where}); they got "
            f"the training median {price_text(median)}; see {stats_path}")


def write_outputs(work_dir: Path, split: str, out_csv: Path, stats_path: Path, ids: list[str], predictions: dict,
                  median: float, index: dict, truth: dict, vectors: bool, stats: dict) -> dict:
    """Rank 0's end of stage 7: the embeddings, or the predictions CSV (every id, the median for the rest) and on
    validation the report; then stats.json, and a WARNING line at the very end (after the progress bar, where it
    is seen) when rows got no prediction. Rows answered with the median keep the exit status 0, as the promise is
    a complete file (a broken shard is skipped under --skip-corrupt-shards, stage 4 may leave a row out); but
    when not one row was read, the samples and the ids do not belong together, and that is an error."""
    from common.errors import PipelineError
    from common.fsio import write_json
    if vectors:
        stats["embeddings"] = write_embeddings(work_dir / "embeddings", split, ids, predictions)
        missing = stats["embeddings"]["missing_ids"]
        reasons = {"no_sample": missing} if missing else {}
        warning = missing and (f"{len(missing)} of {len(ids)} {split} ids have no vector (NaN rows; first ids "
                               f"{', '.join(missing[:5])}); see {stats_path}")
    else:
        rows, reasons = merge(ids, predictions, median, indexed_ids(index))
        write_predictions_csv(out_csv, rows)
        warning = fallback_warning(split, len(ids), reasons, median, index, stats_path)
        stats.update(rows_written=len(rows), fallback_counts={k: len(v) for k, v in reasons.items()},
                     fallback_ids=reasons, fallback_price=median, output=str(out_csv))
        if truth:
            from common.model.report import write_report
            stats["evaluation"] = write_report(work_dir / "eval", rows, truth, median)
    stats["fallback_warning"] = warning or None
    write_json(stats_path, stats)
    log.info("%d rows in -> %s", len(ids), work_dir / "embeddings" if vectors else out_csv)
    unread = len(reasons.get("no_sample", [])) + len(reasons.get("not_in_shards", []))
    if ids and unread == len(ids):
        raise PipelineError(f"none of the {len(ids)} {split} ids was in the samples read: {warning}")
    if warning:
        log.warning("%s", warning)
    return stats
