"""A training run's folder: checkpoints that count only once whole, and the finished run.

A checkpoint counts only once it carries a COMPLETE marker listing its files, written after all of them; a
folder a kill left mid-save is removed before training resumes. The finished run (adapter, tokenizer, image
settings, chat template, prompt, train_config.json, stats.json) is marked COMPLETE last.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import time
from pathlib import Path

from transformers import TrainerCallback

from common.errors import PipelineError
from common.fsio import write_json

log = logging.getLogger("train")
COMPLETE = "COMPLETE"
# Every top-level name a run folder can hold: what save_run writes (adapter, price head, tokenizer, image settings,
# chat template, prompt, configs, marker), the Trainer's checkpoints and TensorBoard runs, atomic_path's temporary
# names and the multi-node probe (common.model.distributed) a kill can leave. A folder holding anything else is
# not one this stage made, so --overwrite must not clear it.
RUN_FILES = frozenset({
    COMPLETE, "runs", "README.md", "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json",
    "price_head.safetensors", "head_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "prompt.json", "train_config.json", "stats.json"})
RUN_PATTERN = re.compile(r"checkpoint-\d+|\..+\.tmp.*|\.shared-[0-9a-f]+")


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def foreign_entries(output_dir: Path) -> list[str]:
    """The names in output_dir that no training run writes."""
    return sorted(p.name for p in Path(output_dir).iterdir()
                  if p.name not in RUN_FILES and not RUN_PATTERN.fullmatch(p.name))


def clear_run_folder(output_dir: Path, what: str = "--output-dir") -> None:
    """Delete a previous run (--overwrite, --no-resume), but only one this stage wrote: a mistyped --output-dir
    such as the work folder itself must not take the images, shards and predictions with it."""
    out = Path(output_dir)
    if not out.exists():
        return
    foreign = foreign_entries(out)
    if foreign:
        raise PipelineError(overwrite_refusal(out, foreign, what))
    shutil.rmtree(out)


def overwrite_refusal(out: Path, foreign: list[str], what: str) -> str:
    return (f"{what} {out} holds files stage 6 did not write (e.g. {', '.join(foreign[:3])}), so --overwrite / "
            "--no-resume will not clear it; pick another folder")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole, from its own header (the data it promises must all be there), or
    None. Reads the header only, so checking a checkpoint costs no load."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes, no header)"
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            return f"is truncated or damaged ({size} bytes, shorter than its {n}-byte header)"
        try:
            header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, IndexError):
            return "has a damaged header"
    if 8 + n + end != size:
        return f"is truncated ({size} of {8 + n + end} bytes)"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint marked COMPLETE cannot be resumed from: a file gone, a size other than the one recorded
    when it was marked (markers written before sizes were recorded have none), or a truncated safetensors file."""
    try:
        marker = json.loads((ckpt / COMPLETE).read_text())
        files, sizes = marker["files"], marker.get("sizes", {})
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{ckpt / COMPLETE} is damaged"
    for name in files:
        path = ckpt / name
        if not path.exists():
            return f"{path} is missing"
        if name in sizes and path.stat().st_size != sizes[name]:
            return f"{path} is {path.stat().st_size} bytes, not the {sizes[name]} it was saved with"
        problem = safetensors_problem(path) if name.endswith(".safetensors") else None
        if problem:
            return f"{path} {problem}"
    return None


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose COMPLETE marker is there and whose files are all still whole. One damaged by a
    full disk or a copy cut short is passed over with a warning naming the file and the checkpoint chosen instead;
    it is left where it is (the Trainer saves over it when training reaches its step again)."""
    damaged = []
    chosen = None
    ckpts = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    for ckpt in sorted(ckpts, key=checkpoint_step, reverse=True):
        if not (ckpt / COMPLETE).exists():
            continue
        problem = checkpoint_problem(ckpt)
        if problem is None:
            chosen = ckpt
            break
        damaged.append(problem)
    for problem in damaged:
        log.warning("%s; %s", problem, f"resuming from {chosen.name} instead" if chosen else
                    "no older complete checkpoint: training starts fresh")
    return chosen


def remove_incomplete_checkpoints(output_dir: Path) -> list[str]:
    """Folders a kill left mid-save; they would otherwise be overwritten piecemeal or picked up."""
    removed = []
    for p in Path(output_dir).glob("checkpoint-*"):
        if not (p / COMPLETE).exists():
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint COMPLETE once its files are written, the price head's among them (regression)."""

    def __init__(self, head=None, price_floor: float = 0.01):
        self.head, self.price_floor = head, price_floor

    def _writes(self, args, state) -> bool:
        return state.is_world_process_zero or (args.save_on_each_node and state.is_local_process_zero)

    def on_step_end(self, args, state, control, **kwargs):
        # A resume that passed over a damaged checkpoint saves this step again into the same folder: its old
        # marker must not vouch for the files while they are rewritten
        if control.should_save and self._writes(args, state):
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's files (its RNG state among them) are written before the marker
        if self._writes(args, state):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.exists():
                if self.head is not None:
                    from common.model.head import save_head
                    save_head(self.head, ckpt, self.price_floor)
                entries = sorted(p for p in ckpt.iterdir() if p.name != COMPLETE)
                write_json(ckpt / COMPLETE, {"step": state.global_step, "files": [p.name for p in entries],
                                             "sizes": {p.name: p.stat().st_size for p in entries if p.is_file()}})


def save_run(out: Path, model, tokenizer, model_path: str, train_config: dict, stats: dict, head=None,
             price_floor: float = 0.01) -> None:
    """The adapter (and the price head) and everything stage 7 needs beside them, then the COMPLETE marker."""
    from common.prompt import SYSTEM_PROMPT, USER_TEMPLATE
    if head is not None:
        from common.model.head import save_head
        save_head(head, out, price_floor)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ("preprocessor_config.json", "chat_template.jinja", "chat_template.json"):
        if (Path(model_path) / name).exists():
            shutil.copy(Path(model_path) / name, out / name)
    write_json(out / "prompt.json", {"system": SYSTEM_PROMPT, "user_template": USER_TEMPLATE, "price_format": "%.2f"})
    write_json(out / "train_config.json", train_config)
    write_json(out / "stats.json", stats)
    write_json(out / COMPLETE, {"finished": time.strftime("%Y-%m-%d %H:%M:%S")})
