"""Loader workers stopped before the process exits, so a stage exits when its work is done.

torch 2.11 (the GPU build) registers, for a loader with persistent workers and pinned memory, an exit hook that
joins each worker with a 5 s timeout before anything has told the workers to stop: each join times out, so
stage 6 sat ~20 s after saving (4 workers; seen as the main thread in `_clean_up_worker` in a stack dumped at
exit). torch 2.13 stops them first. Stopping every loader's workers ourselves, before the hooks run, makes both
exit at once. `_iterator` and `_shutdown_workers` are torch internals, kept in this one place.
"""
from __future__ import annotations

import gc
import sys


def stop_loader_workers() -> int:
    """Shut down the workers of every live DataLoader iterator; return how many iterators were stopped. A loader
    iterated again afterwards starts new workers."""
    dataloader = sys.modules.get("torch.utils.data.dataloader")
    if dataloader is None:  # torch never loaded: no loader can exist
        return 0
    stopped = 0
    # type(), not isinstance(): isinstance reads __class__, which some deprecated torch objects answer with a warning
    for loader in [o for o in gc.get_objects() if issubclass(type(o), dataloader.DataLoader)]:
        iterator = getattr(loader, "_iterator", None)
        if isinstance(iterator, dataloader._MultiProcessingDataLoaderIter):
            loader._iterator = None
            iterator._shutdown_workers()
            stopped += 1
    return stopped
