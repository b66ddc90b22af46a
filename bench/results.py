"""Shared by the benchmarks: the device line, and storing a run's table in bench/runs/NAME.json, which
bench/report.py renders into bench/RESULTS.md."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "runs"


def cpu_device() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux names the model; platform only the architecture
        lines = cpuinfo.read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores"


def table(columns: list[str], rows: list[list]) -> str:
    """A markdown table: text left, numbers right."""
    right = [all(isinstance(r[i], (int, float)) or r[i] == "" for r in rows) for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    return "\n".join(lines + ["| " + " | ".join(f"{c:g}" if isinstance(c, float) else str(c) for c in row) + " |"
                               for row in rows])


def save(name: str, title: str, columns: list[str], rows: list[list], command: str, device: str, **extra) -> Path:
    """One benchmark's table (one number a cell) with its device, date and command."""
    RUNS.mkdir(exist_ok=True)
    record = {"title": title, "device": device, "date": time.strftime("%Y-%m-%d"), "command": command,
              "columns": columns, "rows": rows, **extra}
    path = RUNS / f"{name}.json"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path
