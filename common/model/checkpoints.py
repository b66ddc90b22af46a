"""A training run's folder: checkpoints that count only once whole, and the finished run.

A checkpoint counts only once it carries a COMPLETE marker listing its files, written after all of them; a
folder a kill left mid-save is removed before training resumes. The finished run (adapter, tokenizer, image
settings, chat template, prompt, train_config.json, stats.json) is marked COMPLETE last.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from common.fsio import write_json

log = logging.getLogger("train")
COMPLETE = "COMPLETE"


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose COMPLETE marker is there and whose files all still are."""
    for ckpt in sorted(Path(output_dir).glob("checkpoint-*"), key=checkpoint_step, reverse=True):
        marker = ckpt / COMPLETE
        if not marker.exists():
            continue
        missing = [f for f in json.loads(marker.read_text())["files"] if not (ckpt / f).exists()]
        if missing:
            log.warning("%s is missing %s; resuming from an older checkpoint", ckpt, ", ".join(missing))
            continue
        return ckpt
    return None


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

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's files (its RNG state among them) are written before the marker
        if state.is_world_process_zero or (args.save_on_each_node and state.is_local_process_zero):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.exists():
                if self.head is not None:
                    from common.model.head import save_head
                    save_head(self.head, ckpt, self.price_floor)
                write_json(ckpt / COMPLETE, {"step": state.global_step,
                                             "files": sorted(p.name for p in ckpt.iterdir())})


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
