"""A sampling profiler for the host side of a run, from the standard library alone: a daemon thread wakes every
--every seconds, reads the main thread's Python stack (sys._current_frames), topped by those of threads started
from C++ (the autograd engine's, where a CUDA backward runs), and writes it to one file, into which the run writes
its step boundaries too. Read back, each step's samples say where its host time went, e.g. the
seconds a CUDA graph's recording takes. Each sample stands for the time since the one before: when the main
thread holds the GIL in a long C++ call the sampler wakes late, and the wait is charged to the stack it then sees
(the Python frame that made the call, or the one just after it). faulthandler's watchdog, which needs no GIL,
segfaulted the 3B's training on an H100 within seconds (h100-zu), so it is not used.

    python bench/gpu_train_speed.py --result R.json --sample-stacks S.txt --sample-every 0.1 -- ...
    python bench/stack_samples.py S.txt --result R.json --steps record      (the steps that recorded graphs)
    python bench/stack_samples.py S.txt --steps 7,8 --top 30

--steps: all (default) | record (with --result: each padded length's second step, when --cuda-graphs records)
| replay (a length's third step on) | a comma list of step numbers (0-based, the order the steps ran). Prints per
function (file:function), of the main thread's samples in those steps: `self` (innermost frame) and `incl`
(anywhere on the stack) in seconds, top --top by each.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

MARK = "== step "
SAMPLE = "== sample "


class Sampler:
    """Samples the calling thread's stack each `every` seconds into `path`; `step(k)` marks step k's begin there."""

    def __init__(self, path: Path, every: float):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.every = every
        self.target = threading.get_ident()
        self.done = threading.Event()
        self.write(f"== every {every} started {time.time():.3f}\n")
        self.thread = threading.Thread(target=self.loop, name="stack_samples", daemon=True)
        self.thread.start()

    def write(self, text: str):
        os.write(self.fd, text.encode())  # one call per record: the two threads' records never interleave

    def loop(self):
        last = time.perf_counter()
        while not self.done.wait(self.every):
            stacks = self.sample()
            now = time.perf_counter()
            self.write(f"{SAMPLE}{now - last:.4f}\n{stacks}")
            last = now

    def sample(self) -> str:
        """The stacks as text. Every frame is dropped on return: a frame object held past its function's end keeps
        its locals alive, and cudagraph trees fail on a tensor alive in their pool that they do not track (h100-zw)."""
        frames = sys._current_frames()
        del frames[threading.get_ident()]  # this frame, whose locals hold the dict: a cycle only gc would free
        known = {t.ident for t in threading.enumerate()}
        # threads that C++ started (the autograd engine's, which runs the backward's Python while the main thread
        # waits in C++) go first, as if the main thread had called them
        tops = [f for ident, f in frames.items() if ident not in known] + [frames.get(self.target)]
        lines = []
        for frame in tops:
            while frame is not None:
                lines.append(f"{frame.f_code.co_filename}\t{frame.f_code.co_name}\n")
                frame = frame.f_back
        return "".join(lines)

    def step(self, k: int):
        self.write(f"{MARK}{k} {time.time():.3f}\n")

    def stop(self):
        self.done.set()
        self.thread.join()
        self.write(f"== stopped {time.time():.3f}\n")
        os.close(self.fd)


Stack = tuple[float, list[tuple[str, str]]]  # (seconds it stands for, frames innermost first as (file, function))


def parse(path: Path) -> tuple[float, dict[int, list[Stack]]]:
    """(interval, {step: [(seconds, main-thread frames) per sample]}); samples before the first mark: step -1."""
    every, step = 0.0, -1
    per_step: dict[int, list[Stack]] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    for line in opener(path, "rt", errors="replace"):
        if line.startswith("== every "):
            every = float(line.split()[2])
        elif line.startswith(MARK):
            step = int(line[len(MARK):].split()[0])
        elif line.startswith(SAMPLE):
            per_step.setdefault(step, []).append((float(line[len(SAMPLE):]), []))
        elif "\t" in line and per_step.get(step):
            file, func = line.rstrip("\n").split("\t", 1)
            per_step[step][-1][1].append((Path(file).name, func))
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


def profile(stacks: list[Stack], top: int) -> dict:
    """Seconds per file:function, innermost frame only (`self`) and anywhere on the stack (`incl`)."""
    own, incl = Counter(), Counter()
    for seconds, frames in stacks:
        if frames:
            own[f"{frames[0][0]}:{frames[0][1]}"] += seconds
        for name in {f"{a}:{b}" for a, b in frames}:
            incl[name] += seconds
    return {"samples": len(stacks), "seconds": round(sum(s for s, _ in stacks), 2),
            "self": [(k, round(v, 2)) for k, v in own.most_common(top)],
            "incl": [(k, round(v, 2)) for k, v in incl.most_common(top)]}


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
    print(f"{len(steps)} steps, {got['samples']} samples of the main thread every {every} s, {got['seconds']} s")
    for kind in ("self", "incl"):
        print(f"-- {kind}")
        for name, seconds in got[kind]:
            print(f"{seconds:8.2f} s  {name}")


if __name__ == "__main__":
    main()
