"""Where a split's shards live: a local folder, a folder URL, a brace pattern, or a `pipe:` command.

    work/webdataset_train                                        a local folder (stage 5's own)
    https://host/data/webdataset_train                           a folder URL: its index.json, then its shards
    /data/train-shard-{000000..000067}.tar                       a brace pattern, local or URL
    pipe:aws s3 cp s3://bucket/train/train-shard-{000000..000067}.tar -    a command per shard, output on stdout

Remote shards are opened by WebDataset's `gopen` (a subprocess for pipe:); http(s):// goes through curl with a
stall limit (`_curl_command`), as gopen's own curl has none and waits forever on a server that never answers. The
sample counts
come from the index.json that stage 5 writes beside the shards, fetched the same way (the pattern's file name
replaced by index.json), so training plans its steps and promises each sample once an epoch as it does on a
local folder. A brace pattern may name more shards than the index: only those the index lists are read, in its
order. `{split}` in a template is replaced by the split's name first (6_train.py / 7_infer.py --shards).
"""
from __future__ import annotations

import json
import posixpath
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common.errors import PipelineError

INDEX = "index.json"
# curl gives up on a transfer that sends less than a byte a second for this long (a server that accepts and never
# answers, a stalled peer); a slow but moving download of a large shard is left alone
STALL_S = 60


class ShardError(PipelineError, RuntimeError):
    """A shard that cannot be read; the message names it."""


@dataclass(frozen=True)
class Shard:
    url: str             # a local path, a URL, or a pipe: command
    samples: int
    bytes: int | None
    local: bool


@dataclass
class ShardSource:
    spec: str
    index: dict
    shards: list[Shard]

    @property
    def local_folder(self) -> Path | None:
        return Path(self.spec) if self.shards and self.shards[0].local and Path(self.spec).is_dir() else None


def _is_remote(spec: str) -> bool:
    return spec.startswith(("pipe:", "http://", "https://"))


def _curl_command(url: str) -> str:
    return (f"pipe:curl --fail --silent --show-error --location --connect-timeout 30 --retry 3 --retry-delay 2 "
            f"--speed-limit 1 --speed-time {STALL_S} {shlex.quote(url)}")


def _open(location: str):
    """A binary stream of a shard or index behind a URL or pipe: command."""
    from webdataset.gopen import gopen
    return gopen(_curl_command(location) if location.startswith(("http://", "https://")) else location, "rb")


def _index_location(spec: str) -> str:
    """Where the index of a pattern or pipe command lives: its shard file name replaced by index.json."""
    token = next((t for t in spec.split() if "{" in t or t.endswith(".tar")), None)
    if token is None:
        raise ShardError(f"{spec}: no shard pattern to find its index.json by (give {{000000..000067}})")
    return spec.replace(token, posixpath.join(posixpath.dirname(token), INDEX), 1)


def _fetch_index(location: str) -> dict:
    stream = None
    try:
        if not _is_remote(location):
            return json.loads(Path(location).read_text(encoding="utf-8"))
        stream = _open(location)
        data = stream.read()
        stream.close()
        return json.loads(data)
    except FileNotFoundError:
        raise ShardError(f"{location} not found: run 5_convert.py for this split first") from None
    except (OSError, ValueError) as err:
        reason = (_fetch_failure(stream) if stream is not None else None) or _first_line(err)
        raise ShardError(f"cannot read the shard index {location}: {reason}") from None


def open_source(spec: str) -> ShardSource:
    """The shards and index of one split, wherever they are."""
    from braceexpand import braceexpand
    spec = str(spec)
    if "{" not in spec and not spec.startswith("pipe:") and not spec.endswith(".tar"):
        base = spec.rstrip("/")
        index = _fetch_index(f"{base}/{INDEX}" if _is_remote(base) else str(Path(base) / INDEX))
        local = not _is_remote(base)
        shards = [Shard(f"{base}/{s['name']}" if not local else str(Path(base) / s["name"]), s["samples"],
                        s.get("bytes"), local) for s in index["shards"]]
        return ShardSource(spec, index, shards)
    index = _fetch_index(_index_location(spec))
    urls = list(braceexpand(spec))
    by_name = {_shard_name(u): u for u in urls}
    shards = [Shard(by_name[s["name"]], s["samples"], s.get("bytes"), not _is_remote(spec))
              for s in index["shards"] if s["name"] in by_name]
    if not shards:
        raise ShardError(f"{spec}: names none of the {len(index['shards'])} shards its index.json lists")
    kept = {**index, "shards": [s for s in index["shards"] if s["name"] in by_name],  # a pattern may name a part
            "samples": sum(s.samples for s in shards)}
    return ShardSource(spec, kept, shards)


def _shard_name(url: str) -> str:
    token = next((t for t in url.split() if t.endswith(".tar")), url)
    return posixpath.basename(re.sub(r"^\w+://[^/]+", "", token))


def iter_remote_shard(url: str):
    """Raw WebDataset samples of a shard behind a URL or pipe: command."""
    from webdataset.tariterators import group_by_keys, tar_file_expander
    stream = None
    try:
        stream = _open(url)
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        # the tar's end-of-archive padding is still on its way: closing the pipe before it arrives fails curl's
        # last write (status 23) and a complete shard would read as a failed fetch
        while stream.read(1 << 16):
            pass
        stream.close()  # a failed download or command raises here, with its exit status
    except (OSError, ValueError, EOFError) as err:
        raise ShardError(f"cannot read shard {url}: {_fetch_failure(stream) or _first_line(err)}") from None
    except Exception as err:  # tarfile's errors, and WebDataset's own
        if not type(err).__module__.startswith(("tarfile", "webdataset")):
            raise
        # A failed fetch reaches tarfile as an empty or short stream, often before curl has exited: its exit status
        # is the real cause, so wait for it before calling the bytes corrupt.
        failed = _fetch_failure(stream)
        if failed:
            raise ShardError(f"cannot read shard {url}: {failed}") from None
        raise ShardError(f"corrupt or truncated shard {url}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    """The reason alone: WebDataset appends its stream object and URL to an error's args."""
    reason = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    return reason.splitlines()[0] if reason else type(err).__name__


def _fetch_failure(stream, wait_s: float = 5.0) -> str | None:
    """Which fetch failed and its exit status ('curl exited with status 22'); None if it succeeded or still runs."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        status = proc.wait(wait_s)
    except subprocess.TimeoutExpired:  # still sending bytes: the error is in them
        proc.kill()
        return None
    if status == 0:
        return None
    if "curl" not in str(stream.args):
        return f"the command exited with status {status}"
    why = {6: "host not found", 7: "could not connect", 22: "an HTTP error status",
           28: f"no answer, or stalled for {STALL_S} s"}.get(status)
    return f"curl exited with status {status}" + (f" ({why})" if why else "")
