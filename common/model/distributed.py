"""torchrun across processes and nodes: the process group, whether the nodes share the output folder, and the one
checkpoint every rank resumes from.

With several nodes (`torchrun --nnodes N`), checkpoints are saved once when every node sees the same output
folder (a shared filesystem: rank 0 writes a marker, every rank looks for it), else once per node; either way all
ranks resume from the newest checkpoint that every one of them has whole.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch
import torch.distributed as dist

from common.errors import PipelineError


class RankLost(PipelineError, RuntimeError):
    pass


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def nodes() -> int:
    return max(1, world() // int(os.environ.get("LOCAL_WORLD_SIZE", world())))


def init_distributed() -> None:
    """Under torchrun, the process group the ranks meet in (NCCL on GPUs, gloo on CPUs); the Trainer uses it."""
    if world() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def output_shared_by_all_nodes(out: Path) -> bool:
    """Whether every node sees rank 0's files in `out` (one node: yes)."""
    if nodes() == 1 or not dist.is_initialized():
        return True
    token = [secrets.token_hex(8) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = Path(out) / f".shared-{token[0]}"
    if dist.get_rank() == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
    dist.barrier()
    seen = torch.tensor(int(marker.exists()), device=_device())
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    dist.barrier()
    if dist.get_rank() == 0:
        marker.unlink()
    return bool(seen.item())


def agreed_checkpoint(mine: Path | None) -> Path | None:
    """The checkpoint all ranks resume from: the newest step every rank has complete (each node its own copy)."""
    if not dist.is_initialized():
        return mine
    step = torch.tensor(int(mine.name.rsplit("-", 1)[1]) if mine else -1, device=_device())
    dist.all_reduce(step, op=dist.ReduceOp.MIN)
    if step.item() < 0:
        return None
    return (mine.parent if mine else Path()) / f"checkpoint-{step.item()}"
