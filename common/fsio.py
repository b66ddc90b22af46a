"""Files that are either whole or absent: temp name + fsync + rename, and the stats every stage writes."""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

# A sample_id becomes a file name, so it must not be able to name a path of its own.
_UMASK = os.umask(0)
os.umask(_UMASK)
SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def is_safe_id(sample_id: str) -> bool:
    return bool(SAFE_ID.fullmatch(sample_id)) and ".." not in sample_id  # fullmatch: "$" would let "x\n" in


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = ""):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private to this user
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path | str):
    """The JSON a stage wrote; a damaged file (edited, or written by another tool) is one line naming it."""
    from common.errors import PipelineError
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PipelineError(f"{path}: not valid JSON ({err}); rerun the stage that writes it") from None


def settle_params(out_dir: Path, params: dict, force: bool, made: str, error=None) -> bool:
    """Refuse to mix outputs made with other options in one folder unless `force`, then record them in
    params.json. Returns whether they differ from those recorded (the caller redoes its outputs)."""
    from common.errors import PipelineError
    path = Path(out_dir) / "params.json"
    changed = path.exists() and read_json(path) != params
    if changed and not force:
        raise (error or PipelineError)(f"{out_dir} was {made} with {read_json(path)}, not {params}; pass --force to "
                                       "redo it with the new options")
    write_json(path, params)
    return changed


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp" in name


def clean_temp_files(folder: Path | str, owned=lambda name: True) -> int:
    """Remove temp files a killed run left behind (those `owned(final file name)` says are this run's: parts of a
    catalog running at once in one folder clean up only their own); they are never mistaken for outputs."""
    folder = Path(folder)
    if not folder.exists():
        return 0
    removed = 0
    for p in folder.iterdir():
        if p.is_file() and is_temp_name(p.name) and owned(p.name[1:].split(".tmp")[0].rsplit(".", 1)[0]):
            p.unlink()
            removed += 1
    return removed
