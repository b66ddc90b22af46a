"""GPU busy step by step for a stored run whose bench predates `step_busy`: nvidia-smi's
mean utilization over each timed step of each one-GPU training phase, from the run's own gpu_util.csv. Writes
`step_busy` into bench/gpu_runs/LABEL.json, as gpu_bench.py now does itself:

    python bench/step_busy.py LABEL OUT/gpu_util.csv
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_bench import step_busy, util_samples

RUNS = Path(__file__).resolve().parent / "gpu_runs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("label")
    ap.add_argument("util_csv", type=Path)
    a = ap.parse_args()
    path = RUNS / f"{a.label}.json"
    run, points = json.loads(path.read_text()), util_samples(a.util_csv).get("0", [])
    for phase, entry in run.items():
        one_gpu = isinstance(entry, dict) and entry.get("result") and not entry.get("other_ranks")
        if phase.startswith("train") and one_gpu:
            entry["step_busy"] = step_busy(points, entry["result"])
            print(a.label, phase, f"{len(entry['step_busy'])} steps")
    path.write_text(json.dumps(run, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
