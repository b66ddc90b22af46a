"""One device call: a random-weight Qwen2.5-VL-3B, the real catalog's text with drawn photos served from 127.0.0.1,
and stages 6 and 7 timed in phases, each baseline beside ours in the same call. OUT/results.json is rewritten as
each phase ends; OUT/bench.log holds every phase's output.

Phases (a phase's name picks its options; finished build and data are reused on a warm machine):

  build             bench/gpu_build_model.py: the 3B shape, random weights, the real tokenizer
  data              bench/gpu_make_data.py, then ./run.sh stages 1-5 over the served photos
  run_sh            ./run.sh --data-dir D --model M, nothing else: stages 1-7 as a user runs them
  calibrate         bench/gpu_calibrate.py: memory and step time by micro-batch and checkpointing
  train_baseline    6_train.py as the libraries give it: every speed lever off, 16-bit, batch 4 x 4
  train_default     6_train.py with no options (the plan)        train_best  the fastest options found by hand
  train_off_LEVER   train_default with one lever off (its A/B)   train_budgetN   with --max-gpu-memory N
  train_fp16        with --dtype float16                         train_unsloth   with --backend unsloth
  train_regression  with --objective regression                train_unsloth_plain   Unsloth as it comes (levers off)
  train_unsloth_16x1, train_unsloth_8x2   Unsloth at that micro-batch x accumulation, recomputing nothing
  infer_*           7_infer.py the same ways (baseline: every lever off, batch 64), over train_default's adapter
                    (infer_regression over train_regression's); infer_best128, infer_regression128 at batch 128;
                    infer_regression_eager: its decoder layers not compiled (lever compile_one_forward off)
  old_train, old_infer   the code before the reorganization (a checkout in .old/), train_best's and infer_best's
                    options in its own spelling, timed by its own wrappers

    python bench/gpu_bench.py --out $OUT --deadline 560 --phases build,data,run_sh,infer_best,train_best
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BEST_TRAIN = ["--backend", "hf", "--base-precision", "16bit", "--batch-size", "16", "--grad-accum", "1",
              "--gradient-checkpointing", "off", "--group-by-length"]
OLD_TRAIN = ["--backend", "hf", "--no-load-in-4bit", "--batch-size", "16", "--grad-accum", "1", "--group-by-length"]
TRAIN = {"baseline": ["--backend", "hf", "--base-precision", "16bit", "--batch-size", "4", "--grad-accum", "4",
                      "--speedups-off", "all"],
         "default": [], "best": BEST_TRAIN, "fp16": ["--dtype", "float16"], "unsloth": ["--backend", "unsloth"],
         "unsloth_plain": ["--backend", "unsloth", "--speedups-off", "all"],
         # the Unsloth plan's alternatives on an 80 GB card: its one recomputation switch, or half the micro-batch
         "unsloth_16x1": ["--backend", "unsloth", "--batch-size", "16", "--grad-accum", "1",
                          "--gradient-checkpointing", "off"],
         "unsloth_8x2": ["--backend", "unsloth", "--batch-size", "8", "--grad-accum", "2",
                         "--gradient-checkpointing", "off"],
         "regression": ["--objective", "regression"]}
INFER = {"baseline": ["--speedups-off", "all", "--batch-size", "64"], "default": [],
         "best": ["--backend", "hf", "--batch-size", "64"], "fp16": ["--dtype", "float16"], "regression": [],
         # the regression forward keeps no KV cache (16 GiB at batch 64 against the text path's 26): does a larger
         # batch make it faster, and the text path with it?
         "regression128": ["--batch-size", "128"], "best128": ["--backend", "hf", "--batch-size", "128"],
         "regression_eager": ["--speedups-off", "compile_one_forward"]}


class Bench:
    def __init__(self, args):
        self.a, self.out, self.deadline = args, args.out, time.time() + args.deadline
        self.root = args.root
        self.model, self.data, self.work = self.root / "model", self.root / "dataset", self.root / "work"
        self.results = {"device": device_name(), "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M")}
        self.server = None

    def run(self, name: str, cmd: list, limit: float, cwd: Path = ROOT, env: dict | None = None) -> dict:
        left = self.deadline - time.time()
        if left < 20:
            return {"status": "skipped: deadline"}
        started = time.time()
        with open(self.out / "bench.log", "a") as log:
            log.write(f"\n===== {name}: {' '.join(map(str, cmd))}\n")
            log.flush()
            try:
                rc = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHON": PY, "PYTHONPATH": traced_path(), **(env or {})},
                                    timeout=min(limit, left - 10)).returncode
                status = "ok" if rc == 0 else f"exit {rc}"
            except subprocess.TimeoutExpired:
                status = "timeout"
        return {"status": status, "seconds": round(time.time() - started, 1)}

    def serve(self) -> None:
        if self.server is None:
            sys.path.insert(0, str(ROOT))
            from common.demo.imageserver import ImageServer
            self.server = ImageServer(self.root / "images", port=self.a.port).start()

    def stage6(self, name: str, options: list) -> dict:
        out = self.work / "bench" / name
        cmd = [PY, "6_train.py", "--work-dir", self.work, "--model", self.model, "--output-dir", out, "--overwrite",
               *(["--max-steps", self.a.steps] if self.a.steps else []), "--eval-steps", 0, "--eval-samples", 4,
               "--save-steps", 100000, "--logging-steps", 5, "--workers", 4, *options]
        # Unsloth imports and patches for ~40 s and compiles its layers in a first step of ~95 s (H100)
        limit = self.a.phase_limit * (2 if "unsloth" in options else 1)
        done = self.run(name, cmd, limit)
        return {**done, **train_figures(out / "stats.json")}

    def stage7(self, name: str, options: list, adapter: Path) -> dict:
        run_dir, output = self.work / "bench" / f"{name}_run", self.work / "bench" / f"{name}.csv"
        # a phase run again measures again: stage 7 would resume the finished file and time nothing
        shutil.rmtree(run_dir, ignore_errors=True)
        output.unlink(missing_ok=True)
        cmd = [PY, "7_infer.py", "--work-dir", self.work, "--data-dir", self.data, "--train-dir", adapter,
               "--output", output, "--run-dir", run_dir, "--workers", 4, *options]
        done = self.run(name, cmd, self.a.phase_limit)
        return {**done, **infer_figures(run_dir / "stats.json")}

    def phase(self, name: str) -> dict:
        if name == "build":
            if (self.model / "random_model.json").exists():
                return {"status": "reused"}
            return self.run(name, [PY, "bench/gpu_build_model.py", "--out", self.model, "--size", self.a.size], 120)
        if name == "data":
            if (self.work / "webdataset_test" / "index.json").exists():
                self.serve()
                return {"status": "reused"}
            made = self.run("draw", [PY, "bench/gpu_make_data.py", "--root", self.root, "--train-rows",
                                     self.a.train_rows, "--test-rows", self.a.test_rows, "--port", self.a.port], 120)
            self.serve()
            return {"draw": made, **self.run(name, ["bash", "run.sh", "--data-dir", self.data, "--work-dir", self.work,
                                                    "--model", self.model, "--to-stage", "5", "--args-1",
                                                    "--allow-private-hosts"], 300)}
        if name == "run_sh":
            self.serve()
            done = self.run(name, ["bash", "run.sh", "--data-dir", self.data, "--work-dir", self.work, "--model",
                                   self.model, "--args-1", "--allow-private-hosts"], self.a.phase_limit * 3)
            return {**done, "train": train_figures(self.work / "train" / "stats.json"),
                    "infer": infer_figures(self.work / "infer_test" / "stats.json")}
        if name == "calibrate":
            return self.run(name, [PY, "bench/gpu_calibrate.py", "--model", self.model, "--work", self.work, "--out",
                                   self.out / "calibrate.json", "--limit-s", self.a.phase_limit],
                            self.a.phase_limit + 60)
        if name.startswith("old_"):
            return self.old(name)
        kind, _, variant = name.partition("_")
        options = option_set(variant, TRAIN if kind == "train" else INFER)
        if kind == "train":
            return self.stage6(name, options)
        # run.sh's adapter (WORK/train) counts too: spelled through bench/.., it was missed while bench/ did not exist
        bench = self.work / "bench"
        trained = [bench / "train_regression"] if variant.startswith("regression") else \
            [bench / "train_default", bench / "train_best", self.work / "train"]
        adapter = next((t for t in trained if (t / "COMPLETE").exists()), trained[0])
        return self.stage7(name, options, adapter)

    def old(self, name: str) -> dict:
        """The code before the reorganization, with its own timing wrappers (bench/gpu_*_speed.py there)."""
        old = ROOT / ".old"
        result = self.out / f"{name}.json"
        if name == "old_train":
            cmd = [PY, "bench/gpu_train_speed.py", "--result", result, "--name", name, "--", "--work-dir", self.work,
                   "--model", self.model, "--max-steps", self.a.steps, "--eval-steps", 0, "--eval-samples", 16,
                   "--save-steps", 100000, "--workers", 4, "--output-dir", self.work / "bench" / name, "--overwrite",
                   *OLD_TRAIN]
        else:
            cmd = [PY, "bench/gpu_infer_speed.py", "seven", "--result", result, "--", "--work-dir", self.work,
                   "--data-dir", self.data, "--split", "test", "--backend", "hf", "--batch-size", 64, "--workers", 4,
                   "--output", self.work / "bench" / f"{name}.csv", "--train-dir", self.work / "bench" / "old_train"]
        path = os.pathsep.join([str(old), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                             if p and Path(p).resolve() != ROOT]])
        done = self.run(name, cmd, self.a.phase_limit, cwd=old, env={"PYTHONPATH": path})
        figures = json.loads(result.read_text()) if result.exists() else {}
        keep = ("samples_per_s", "samples_per_s_window", "train_peak_gib", "median_step_s", "first_step_s")
        return {**done, **{k: figures[k] for k in keep if k in figures}}


def traced_path() -> str:
    """PYTHONPATH with bench/exit_trace first: a stage slow to exit dumps its threads' stacks into the log."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(ROOT / "bench" / "exit_trace"), *rest])


def option_set(variant: str, table: dict) -> list:
    if variant.startswith("budget"):
        return ["--max-gpu-memory", variant[len("budget"):]]
    if variant.startswith("off_"):
        return ["--speedups-off", variant[len("off_"):]]
    return table[variant]


def train_figures(path: Path) -> dict:
    if not path.exists():
        return {}
    stats = json.loads(path.read_text())
    losses = [h["loss"] for h in stats["log_history"] if "loss" in h]
    return {**stats["timing"], "plan": stats["plan"], "speed_levers": stats.get("speed_levers"),
            "recompute_batches": stats.get("recompute_batches"),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def infer_figures(path: Path) -> dict:
    if not path.exists():
        return {}
    stats = json.loads(path.read_text())
    run = stats["rank0_run"]
    return {k: run.get(k) for k in ("steady_samples_per_s", "samples_per_s", "peak_gpu_gib", "oom_splits")} | {
        "plan": stats.get("plan"), "fallbacks": stats.get("fallback_counts")}


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "CPU"
    except (OSError, subprocess.TimeoutExpired):
        return "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results.json, bench.log and calibrate.json go here")
    ap.add_argument("--phases", required=True, help="comma-separated, run in this order")
    ap.add_argument("--root", type=Path, default=Path("/tmp/gpu_bench"), help="model, data and work folders")
    ap.add_argument("--deadline", type=float, default=560, help="seconds for the whole call")
    ap.add_argument("--phase-limit", type=float, default=150,
                    help="seconds for one stage run (twice that for the Unsloth training phases)")
    ap.add_argument("--steps", type=int, default=30,
                    help="optimizer steps per training phase (0: one epoch, as run.sh)")
    ap.add_argument("--train-rows", type=int, default=512)
    ap.add_argument("--test-rows", type=int, default=640)
    ap.add_argument("--size", default="3b", choices=["3b", "small"], help="small: a CPU check of the phases")
    ap.add_argument("--port", type=int, default=8790)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    for name in args.phases.split(","):
        bench.results[name] = bench.phase(name)
        (args.out / "results.json").write_text(json.dumps(bench.results, indent=1))
        print(name, json.dumps(bench.results[name]), flush=True)


if __name__ == "__main__":
    main()
