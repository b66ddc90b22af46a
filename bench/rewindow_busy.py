"""GPU busy of a stored training run, over a window moved back to where its steps ended.

Before commit 2f1d6b6 the training timer ended its steady window when training ended, after the Trainer's
closing checkpoint, so the window matched against nvidia-smi's samples ran up to ~1.5 s past the last step onto
an idle GPU, and the busy figure came out low. That run's window cannot be redrawn exactly (the gap was not
recorded); this estimates it from the samples: the window, same length, now ends at its last sample with the GPU
at least 50% busy (the closing save that follows is idle). Writes `gpu_busy_rewindowed` per training phase (and
the idle samples it moved past, `util_tail`) into bench/gpu_runs/LABEL.json:

    python bench/rewindow_busy.py LABEL OUT/gpu_util.csv
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_bench import util_samples

RUNS = Path(__file__).resolve().parent / "gpu_runs"


def rewindow(points: list[tuple[float, float]], start: float, end: float) -> dict | None:
    inside = [(t, u) for t, u in points if start <= t <= end]
    busy_at = [t for t, u in inside if u >= 50]
    if not busy_at:
        return None
    last = max(busy_at)
    moved = [u for t, u in points if last - (end - start) <= t <= last]
    return {"mean_util_pct": round(sum(moved) / len(moved), 1), "samples": len(moved),
            "shift_s": round(end - last, 2), "util_tail": [u for t, u in inside if t > last]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("label")
    ap.add_argument("util_csv", type=Path)
    a = ap.parse_args()
    path = RUNS / f"{a.label}.json"
    run, per_gpu = json.loads(path.read_text()), util_samples(a.util_csv)
    for phase, entry in run.items():
        if not phase.startswith("train") or not isinstance(entry, dict) or not entry.get("gpu_busy"):
            continue
        ranks = [entry["result"], *entry.get("other_ranks", [])]
        start = min(r["steady_start_epoch"] for r in ranks)
        end = max(r["steady_end_epoch"] for r in ranks)
        entry["gpu_busy_rewindowed"] = {f"gpu{g}": rewindow(per_gpu.get(g, []), start, end)
                                        for g in (k.removeprefix("gpu") for k in entry["gpu_busy"])}
        print(a.label, phase, json.dumps(entry["gpu_busy"]), "->", json.dumps(entry["gpu_busy_rewindowed"]))
    path.write_text(json.dumps(run, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
