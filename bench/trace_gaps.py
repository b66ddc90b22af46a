"""Where the GPU waits: busy share and idle gaps of a torch.profiler chrome trace, and what the host was doing.

    python bench/trace_gaps.py TRACE.json[.gz] --window train_step     # re-analyse a trace brought back

Kernel time is also summed by kind, by name: GEMM, attention, fused Triton, eager elementwise and copies, NCCL,
other.

GPU busy = the union of kernel/memcpy/memset intervals inside the windows (user annotations of the given
name), over the windows' wall time. Every idle gap longer than --min-gap-us is charged to what the host ran
at its midpoint: the innermost Python frame from the pipeline's libraries when the trace has Python stacks
(`with_stack=True`), else the innermost aten op / CUDA runtime call.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
OURS = ("common/", "transformers/", "peft/", "trl/", "accelerate/", "torch/optim", "torch/utils/data",
        "torch/nn/utils", "7_infer", "6_train", "unsloth")


def load(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)["traceEvents"]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


KINDS = (("communication (NCCL)", ("nccl",)),
         ("attention", ("fmha", "flash", "attention")),  # before gemm: cutlass attention kernels say "cutlass"
         ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "splitk")),
         ("fused (triton)", ("triton_",)),
         ("elementwise / copy (eager)", ("elementwise", "copy", "cat_", "index", "reduce", "fill", "where")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def _interesting(name: str) -> bool:
    return any(k in name for k in OURS)


def analyse(events: list[dict], window: str, min_gap_us: float = 20.0, top: int = 15) -> dict:
    spans = [e for e in events if e.get("ph") == "X"]
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans
                     if e.get("cat") == "user_annotation" and e.get("name") == window)
    if not windows:
        return {"error": f"no '{window}' annotation in the trace"}
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in spans if e.get("cat") in GPU_CATS])
    kernels, kinds = collections.Counter(), collections.Counter()
    kernel_n = 0
    for e in spans:
        if e.get("cat") == "kernel" and any(s <= e["ts"] <= w for s, w in windows):
            kernels[e["name"][:90]] += e["dur"]
            kinds[kernel_kind(e["name"])] += e["dur"]
            kernel_n += 1
    py = [e for e in spans if e.get("cat") == "python_function" and _interesting(e.get("name", ""))]
    host = py or [e for e in spans if e.get("cat") in ("cpu_op", "cuda_runtime")]
    host.sort(key=lambda e: (e["ts"], -e["dur"]))  # a parent before a child that starts with it
    gaps: list[tuple[float, float]] = []
    charged, counts = collections.Counter(), collections.Counter()
    wall = 0.0
    busy_starts = [s for s, _ in busy]
    for ws, we in windows:
        wall += we - ws
        cursor = ws
        for s, e in busy[max(0, bisect.bisect_left(busy_starts, ws) - 1):bisect.bisect_right(busy_starts, we)]:
            s, e = max(s, ws), min(e, we)
            if e <= cursor:
                continue
            if s > cursor:
                gaps.append((cursor, s))
            cursor = e
        if we > cursor:
            gaps.append((cursor, we))
    idle = sum(e - s for s, e in gaps)
    # charge each gap to the innermost host event covering its midpoint: a sweep over events by start time,
    # keeping those still open (midpoints ascend, so an event that ended stays ended)
    active: list[dict] = []
    nxt = 0
    for start, end in sorted(g for g in gaps if g[1] - g[0] >= min_gap_us):
        mid = (start + end) / 2
        while nxt < len(host) and host[nxt]["ts"] <= mid:
            active.append(host[nxt])
            nxt += 1
        active = [h for h in active if h["ts"] + h["dur"] >= mid]
        label = " < ".join(h["name"][-70:] for h in active[::-1][:2]) if active else "(no host event)"
        charged[label] += end - start
        counts[label] += 1
    return {"window": window, "windows": len(windows), "wall_ms": round(wall / 1e3, 2),
            "gpu_busy_pct": round(100 * (wall - idle) / wall, 1) if wall else None,
            "idle_ms": round(idle / 1e3, 2), "kernels": kernel_n,
            "host_events": "python frames" if py else "aten ops / CUDA runtime",
            "idle_charged_ms": [{"host": k, "ms": round(v / 1e3, 2), "gaps": counts[k]}
                                for k, v in charged.most_common(top)],
            "kernel_kinds_ms": {k: round(v / 1e3, 2) for k, v in kinds.most_common()},
            "top_kernels_ms": [{"kernel": k, "ms": round(v / 1e3, 2)} for k, v in kernels.most_common(top)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--window", required=True)
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    a = ap.parse_args()
    print(json.dumps(analyse(load(a.trace), a.window, a.min_gap_us), indent=1))


if __name__ == "__main__":
    main()
