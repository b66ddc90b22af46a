"""Render bench/RESULTS.md from the stored runs in bench/runs/*.json, in the order of bench/runs/ORDER.

    python bench/report.py            # rewrite bench/RESULTS.md
    python bench/report.py --check    # exit 1 if bench/RESULTS.md is not what the runs render

A run is either a table stored by results.save (title, columns, rows) or a gpu_bench.py results.json with a
"title" added: one row a phase, plus the calibration's measurements when the call ran it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import RUNS, table  # noqa: E402

OUT = RUNS.parent / "RESULTS.md"
PHASE_COLUMNS = ["phase", "status", "backend", "micro x accum", "recompute every", "samples/s", "median-step samples/s",
                 "peak GiB"]
CALIBRATION_COLUMNS = ["recompute every", "micro-batch", "tokens", "step s", "samples/s", "peak GiB"]


def phase_rows(run: dict) -> list[list]:
    rows = []
    for name, phase in run.items():
        if not isinstance(phase, dict) or "status" not in phase or name in ("build", "data", "calibrate"):
            continue
        for part, got in ([("train", phase["train"]), ("infer", phase["infer"])] if "train" in phase else
                          [("", phase)]):
            plan = got.get("plan", {})
            batch = (f"{plan['micro_batch']} x {plan['grad_accum']}" if "micro_batch" in plan else
                     str(plan.get("batch", "")))
            speed = got.get("steady_samples_per_s", got.get("samples_per_s_window", got.get("samples_per_s")))
            rows.append([f"{name} {part}".strip(), phase["status"], plan.get("backend", ""), batch,
                         recomputed(got, plan), "" if speed is None else speed,
                         got.get("median_samples_per_s", ""), got.get("peak_gpu_gib", got.get("train_peak_gib", ""))])
    return rows


def recomputed(got: dict, plan: dict):
    """The plan's level, or with a level per micro-batch how many ran at each ("6 none, 3 2nd")."""
    batches = got.get("recompute_batches")
    if not batches:
        return plan.get("checkpoint_every", "")
    names = {"0": "none", "4": "4th", "2": "2nd", "1": "all"}
    return ", ".join(f"{n} {names[level]}" for level, n in batches.items())


def calibration_rows(run: dict) -> list[list]:
    result = run.get("calibrate", {}).get("result", {})
    return [[m["every"], m["micro"], m["tokens"], m["step_s"], m["samples_per_s"], m["peak_gib"]]
            for m in result.get("train", [])]


def section(name: str, run: dict) -> list[str]:
    lines = [f"## {run['title']}", "", f"Device: {run['device']}. Date: {run.get('date', run.get('started', ''))}.", ""]
    if "columns" in run:
        lines += [table(run["columns"], run["rows"])]
    else:
        lines += [table(PHASE_COLUMNS, phase_rows(run))]
        if calibration_rows(run):
            lines += ["", table(CALIBRATION_COLUMNS, calibration_rows(run))]
    command = run.get("command") or ("python bench/gpu_bench.py " + " ".join(
        "OUT" if a.startswith("/") else a for a in run["argv"]) if "argv" in run else "")
    said = [f"`{command}`"] if command else []
    said += [f"({run['note']})"] if run.get("note") else []
    lines += ["", "  ".join(said), ""]
    return lines


def render() -> str:
    order = [n.strip() for n in (RUNS / "ORDER").read_text().split() if n.strip()]
    lines = ["# Benchmark results", "",
             "Rendered by `python bench/report.py` from `bench/runs/`; a table's rows come from one run unless its note",
             "names the runs.",
             "In phase tables, training samples/s is over the steps after the third, leaving out those that compiled",
             "(runs before h200-call12 include them); median-step samples/s is 16 samples over the median step's time.",
             ""]
    for name in order:
        lines += section(name, json.loads((RUNS / f"{name}.json").read_text()))
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that bench/RESULTS.md is up to date")
    args = ap.parse_args()
    text = render()
    if args.check:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text, encoding="utf-8")
    print(f"{OUT}: {len(text)} bytes")


if __name__ == "__main__":
    main()
