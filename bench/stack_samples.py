"""A sampling profiler for the host side of a run, from the standard library alone: faulthandler's watchdog (a C
thread that needs no GIL, so a long C++ call holding it is sampled as it happens) writes every thread's Python
stack every --every seconds to one file, and the run writes its step boundaries into the same file between them.
Read back, each step's samples say where its host time went, e.g. the seconds a CUDA graph's recording takes.

    python bench/gpu_train_speed.py --result R.json --sample-stacks 0.1 -- ...     (writes R.stacks.txt)
    python bench/stack_samples.py R.stacks.txt --result R.json --steps record      (the steps that recorded graphs)
    python bench/stack_samples.py R.stacks.txt --steps 7,8 --top 30

--steps: all (default) | record (with --result: each padded length's second step, when --cuda-graphs records)
| replay (a length's third step on) | a comma list of step numbers (0-based, the order the steps ran). Prints per
function (file:function), of the main thread's samples in those steps: `self` (innermost frame) and `incl`
(anywhere on the stack) as counts and seconds (count x --every), top --top by each.
"""
from __future__ import annotations

import argparse
import faulthandler
import gzip
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

MARK = "== stack_samples step "
THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+")
FRAME = re.compile(r'^\s+File "(?P<file>.*)", line \d+ in (?P<func>\S+)')


class Sampler:
    """Samples every thread's stack each `every` seconds into `path`; `step(k)` marks step k's begin there."""

    def __init__(self, path: Path, every: float):
        self.file = open(path, "w")
        self.every = every
        self.write(f"== stack_samples every {every} started {time.time():.3f}\n")
        faulthandler.dump_traceback_later(every, repeat=True, file=self.file)

    def write(self, text: str):
        os.write(self.file.fileno(), text.encode())  # the same descriptor faulthandler writes to, unbuffered

    def step(self, k: int):
        self.write(f"{MARK}{k} {time.time():.3f}\n")

    def stop(self):
        faulthandler.cancel_dump_traceback_later()
        self.write(f"== stack_samples stopped {time.time():.3f}\n")
        self.file.close()


def main_stack(threads: list[list[tuple[str, str]]]) -> list[tuple[str, str]] | None:
    """The main thread's frames (innermost first) among one dump's threads: the one not started by threading's
    _bootstrap (faulthandler keeps a stack's innermost 100 frames, so a deep main stack lacks its module frame)."""
    mains = [t for t in threads if t and not (t[-1][0].endswith("threading.py") and t[-1][1] == "_bootstrap")]
    return max(mains, key=len) if mains else None


def parse(path: Path) -> tuple[float, dict[int, list[list[tuple[str, str]]]]]:
    """(interval, {step: [main-thread stack per sample]}); samples before the first mark go to step -1."""
    every, step = 0.0, -1
    per_step: dict[int, list] = {}
    threads: list | None = None

    def close():
        if threads is not None:
            stack = main_stack(threads)
            if stack:
                per_step.setdefault(step, []).append(stack)

    opener = gzip.open if path.suffix == ".gz" else open
    for line in opener(path, "rt", errors="replace"):
        if line.startswith("== stack_samples every "):
            every = float(line.split()[3])
        elif line.startswith(MARK):
            close()
            threads = None
            step = int(line[len(MARK):].split()[0])
        elif line.startswith("Timeout ("):
            close()
            threads = []
        elif threads is not None and THREAD.match(line):
            threads.append([])
        elif threads is not None and threads:
            m = FRAME.match(line)
            if m:
                threads[-1].append((Path(m["file"]).name, m["func"]))
    close()
    return every, per_step


def record_and_replay_steps(result: dict) -> tuple[list[int], list[int]]:
    """From gpu_train_speed's batch_shapes: the steps where a padded length came the second time (CUDA graphs record)
    and those where it came the third time on (they replay)."""
    seen: Counter = Counter()
    record, replay = [], []
    for k, (rows, length) in enumerate(result.get("batch_shapes") or []):
        seen[length] += 1
        (record if seen[length] == 2 else replay if seen[length] > 2 else []).append(k)
    return record, replay


def profile(stacks: list[list[tuple[str, str]]], top: int) -> dict:
    own = Counter(f"{s[0][0]}:{s[0][1]}" for s in stacks if s)
    incl = Counter(f for s in stacks for f in {f"{a}:{b}" for a, b in s})
    return {"samples": len(stacks), "self": own.most_common(top), "incl": incl.most_common(top)}


def summarize(path: Path, result: dict, top: int = 25) -> dict:
    """The record and replay steps' profiles (see record_and_replay_steps) from one stacks file."""
    every, per_step = parse(path)
    out = {"every_s": every}
    for kind, steps in zip(("record", "replay"), record_and_replay_steps(result)):
        out[kind] = {"steps": steps, **profile([s for k in steps for s in per_step.get(k, [])], top)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stacks", type=Path)
    ap.add_argument("--result", type=Path, help="gpu_train_speed's result JSON (for --steps record|replay)")
    ap.add_argument("--steps", default="all")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", action="store_true", help="print the profile as JSON")
    a = ap.parse_args()
    every, per_step = parse(a.stacks)
    if a.steps == "all":
        steps = sorted(per_step)
    elif a.steps in ("record", "replay"):
        if not a.result:
            raise SystemExit("--steps record|replay needs --result")
        record, replay = record_and_replay_steps(json.loads(a.result.read_text()))
        steps = record if a.steps == "record" else replay
    else:
        steps = [int(x) for x in a.steps.split(",")]
    stacks = [s for k in steps for s in per_step.get(k, [])]
    got = {"every_s": every, "steps": steps, "samples_per_step": {k: len(per_step.get(k, [])) for k in steps},
           **profile(stacks, a.top)}
    if a.json:
        print(json.dumps(got, indent=1))
        return
    print(f"{len(steps)} steps, {got['samples']} samples of the main thread every {every} s "
          f"(~{got['samples'] * every:.1f} s)")
    for kind in ("self", "incl"):
        print(f"-- {kind}")
        for name, n in got[kind]:
            print(f"{n:7d} {n * every:8.2f} s  {name}")


if __name__ == "__main__":
    main()
