"""Logging set-up shared by the stages: INFO on rank 0, warnings only on other ranks."""
from __future__ import annotations

import logging
import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup(name: str) -> logging.Logger:
    level = logging.INFO if rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {name} %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)  # force: several stages may run in one process
    for noisy in ("urllib3", "PIL", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(name)


def every_rank(line: str) -> None:
    """A line every rank prints (stage 6's and 7's plan: each rank shows what it runs), prefixed with its rank."""
    import sys
    prefix = f"[rank {rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    sys.stderr.write(f"{prefix}{line}\n")
    sys.stderr.flush()
