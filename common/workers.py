"""Work spread over processes that never hangs on a failing worker.

A worker whose setup raises (a missing model folder, an unreadable tokenizer) or whose task raises does not
leave the pool restarting workers or waiting forever: the stage ends with the first worker's error as one
line (`WorkerError`, exit 1) within seconds. A worker killed outright (out of memory) ends it the same way.
"""
from __future__ import annotations

import functools
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

from common.errors import PipelineError

_setup_error: str | None = None


class WorkerError(PipelineError, RuntimeError):
    pass


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, PipelineError) else f"{type(err).__name__}: {err}"


def _setup(initializer, initargs) -> None:
    global _setup_error
    try:
        if initializer is not None:
            initializer(*initargs)
    except Exception as err:  # handed to the parent with the first task, as one line
        _setup_error = _describe(err)


def _call(fn, item):
    if _setup_error is not None:
        return "failed", f"a worker could not start: {_setup_error}"
    try:
        return "ok", fn(item)
    except Exception as err:
        return "failed", f"a worker failed: {_describe(err)}"


def map_in_processes(fn, items: list, workers: int, initializer=None, initargs: tuple = (), chunksize: int = 16,
                     start_method: str = "spawn"):
    """fn(item) for every item, in order, from `workers` processes (in this one when workers <= 1). fn and the
    initializer must be importable functions. Raises WorkerError with the first failure."""
    if workers <= 1:
        _setup(initializer, initargs)
        if _setup_error is not None:
            raise WorkerError(f"could not start: {_setup_error}")
        yield from map(fn, items)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context(start_method), initializer=_setup,
                               initargs=(initializer, initargs))
    failed = True
    try:
        for status, value in pool.map(functools.partial(_call, fn), items, chunksize=chunksize):
            if status != "ok":
                raise WorkerError(value)
            yield value
        failed = False
    except BrokenProcessPool as err:
        raise WorkerError(f"a worker process died ({err}); out of memory? lower --workers") from None
    finally:
        pool.shutdown(wait=not failed, cancel_futures=True)
