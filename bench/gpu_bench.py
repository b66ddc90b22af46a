"""One device call: build the random 3B model and a realistic work folder, then time training and inference.

Phases (each its own process, each with a time limit inside one overall deadline, so that one failure or
hang does not cost the others; results go to OUT/results.json as each phase ends):

  build          bench/gpu_build_model.py: Qwen2.5-VL-3B's shape, random weights, bf16, real tokenizer
  data           bench/gpu_make_data.py: real catalog text, drawn 448 px images, stages 3-5
  train_unsloth  6_train.py --backend unsloth (4-bit), batch --unsloth-batch       } bench/gpu_train_speed.py
  train_hf       6_train.py --backend hf --no-load-in-4bit (bf16), batch --hf-batch }
  infer_seven_hf       7_infer.py --backend hf, the hf adapter, batch 64, constrained   } bench/gpu_infer_speed.py
  infer_plain          plain transformers generate loop, same model + adapter, batch 64 }
  infer_seven_hf_free  7_infer.py --backend hf --no-constrained (for prediction equality with the plain loop)
  infer_seven_unsloth  7_infer.py --backend unsloth, the unsloth adapter, batch 64

    python bench/gpu_bench.py --out $OUT --deadline 560
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ALL = ["build", "data", "train_unsloth", "train_hf", "infer_seven_hf", "infer_plain", "infer_seven_hf_free",
       "infer_seven_unsloth"]


class Bench:
    def __init__(self, args):
        self.a = args
        self.start = time.time()
        self.out = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.work = args.root / "work"
        args.root.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.a.deadline - (time.time() - self.start)

    def save(self):
        self.results_path.write_text(json.dumps(self.results, indent=1, default=str))

    def run(self, name: str, cmd: list[str], log_name: str, limit: float, result_file: Path | None = None,
            min_needed: float = 30) -> dict | None:
        budget = min(limit, self.left() - 10)
        entry = {"cmd": " ".join(str(c) for c in cmd), "limit_s": round(budget)}
        if budget < min_needed:
            entry["status"] = f"skipped: {self.left():.0f} s left"
            self.results[name] = entry
            self.save()
            print(f"== {name}: {entry['status']}", flush=True)
            return None
        print(f"== {name} (limit {budget:.0f} s): {entry['cmd']}", flush=True)
        t0 = time.time()
        with open(self.out / log_name, "a") as log:
            log.write(f"\n===== {name} {time.strftime('%H:%M:%S')}: {entry['cmd']}\n")
            log.flush()
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
                entry["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                entry["status"] = f"timed out after {budget:.0f} s"
        entry["seconds"] = round(time.time() - t0, 1)
        if result_file is not None and result_file.exists():
            entry["result"] = json.loads(result_file.read_text())
        if entry["status"] != "ok":
            entry["log_tail"] = (self.out / log_name).read_text()[-3000:]
        self.results[name] = entry
        self.save()
        print(f"   {name}: {entry['status']} in {entry['seconds']} s", flush=True)
        return entry.get("result")

    def adapter(self, name: str) -> Path | None:
        d = self.work / f"train_{name}"
        return d if (d / "COMPLETE").exists() else None


def train_args(b: Bench, name: str, backend: str, batch: int) -> list[str]:
    a = b.a
    extra = ["--no-load-in-4bit"] if backend == "hf" else []
    return ["--work-dir", b.work, "--model", a.model_dir, "--backend", backend, "--batch-size", batch,
            "--grad-accum", 1, "--max-steps", a.steps, "--eval-steps", a.eval_steps, "--eval-samples", 16,
            "--eval-batch-size", 16, "--save-steps", 100000, "--logging-steps", 1, "--workers", 4,
            "--output-dir", b.work / f"train_{name}", "--overwrite", *extra]


def infer_seven_args(b: Bench, name: str, backend: str, adapter: Path | None, constrained: bool) -> list[str]:
    args = ["--work-dir", b.work, "--data-dir", b.a.root / "dataset", "--split", "test", "--backend", backend,
            "--batch-size", 64, "--workers", 4, "--output", b.a.root / f"{name}.csv"]
    args += ["--train-dir", adapter] if adapter else ["--adapter", "none", "--model", b.a.model_dir]
    return args + ([] if constrained else ["--no-constrained"])


def same(p, q) -> bool:
    return (p is None and q is None) or (p is not None and q is not None and abs(p - q) < 1e-9)


def compare(b: Bench) -> None:
    got = {k: v.get("result") or {} for k, v in b.results.items() if k.startswith("infer_") and isinstance(v, dict)}
    out = {}
    for x, y in [("infer_plain", "infer_seven_hf_free"), ("infer_plain", "infer_seven_hf"),
                 ("infer_seven_hf", "infer_seven_unsloth")]:
        px, py = got.get(x, {}).get("predictions"), got.get(y, {}).get("predictions")
        if not px or not py:
            continue
        ids = sorted(set(px) & set(py))
        tx, ty = got[x].get("texts") or {}, got[y].get("texts") or {}
        out[f"{x} vs {y}"] = {"rows": len(ids), "equal_price": sum(same(px[i], py[i]) for i in ids),
                              "parsed_x": sum(px[i] is not None for i in ids),
                              "parsed_y": sum(py[i] is not None for i in ids),
                              "equal_text": sum(tx.get(i) is not None and tx.get(i) == ty.get(i) for i in ids),
                              "distinct_texts_x": len(set(tx.values())), "examples": {
                                  i: [tx.get(i), ty.get(i)] for i in ids[:3]}}
    b.results["equality"] = out
    b.save()


def table(b: Bench) -> str:
    r = b.results
    lines = []
    dev = next((v["result"].get("device") for v in r.values() if isinstance(v, dict) and "result" in v
                and isinstance(v["result"], dict) and v["result"].get("device")), "?")
    lines.append(f"device: {dev}")
    lines.append("| training run | backend | batch | samples/s | median step s | peak GiB | first step s | "
                 "loss first -> last | finite |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---|---|")
    for name in ("train_hf", "train_unsloth"):
        e = r.get(name, {})
        x = e.get("result") or {}
        lines.append(f"| {name} ({e.get('status', 'not run')}) | {x.get('backend')} | {x.get('samples_per_step')} | "
                     f"{x.get('samples_per_s')} | {x.get('median_interval_s')} | {x.get('train_peak_gib')} | "
                     f"{x.get('first_step_s')} | {x.get('loss_first')} -> {x.get('loss_last')} | "
                     f"{x.get('all_losses_finite')} |")
    lines.append("")
    lines.append("| inference run | samples/s (end to end) | generate-only samples/s | median batch s | "
                 "first batch s | rows | peak GiB |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("infer_plain", "infer_seven_hf", "infer_seven_hf_free", "infer_seven_unsloth"):
        e = r.get(name, {})
        x = e.get("result") or {}
        lines.append(f"| {name} ({e.get('status', 'not run')}) | {x.get('samples_per_s')} | "
                     f"{x.get('generate_samples_per_s')} | {x.get('median_generate_s')} | {x.get('first_batch_s')} | "
                     f"{x.get('samples')} | {x.get('peak_gib')} |")
    lines.append("")
    lines.append(f"equality: {json.dumps(r.get('equality'))}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    ap.add_argument("--root", type=Path, default=Path("/tmp/gpu_bench"))
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen25vl3b-random"))
    ap.add_argument("--size", default="3b")
    ap.add_argument("--phases", default=",".join(ALL))
    ap.add_argument("--deadline", type=float, default=560, help="seconds for everything")
    ap.add_argument("--train-rows", type=int, default=640)
    ap.add_argument("--test-rows", type=int, default=640)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--hf-batch", type=int, default=4)
    ap.add_argument("--unsloth-batch", type=int, default=16)
    ap.add_argument("--limits", default="build=120,data=120,train_unsloth=260,train_hf=120,infer=100,"
                                        "infer_seven_unsloth=200")
    a = ap.parse_args()
    limits = {k: float(v) for k, v in (x.split("=") for x in a.limits.split(","))}
    b = Bench(a)
    phases = a.phases.split(",")
    env = {"device_info": subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
           if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0 else "no nvidia-smi",
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": phases, "cpus": os.cpu_count()}
    b.results["env"] = env
    b.save()
    print(json.dumps(env), flush=True)
    if "build" in phases:
        b.run("build", [PY, "bench/gpu_build_model.py", "--out", a.model_dir, "--size", a.size], "setup.log",
              limits["build"])
        info = a.model_dir / "random_model.json"
        if info.exists():
            b.results["build"]["result"] = json.loads(info.read_text())
            b.save()
    if "data" in phases:
        b.run("data", [PY, "bench/gpu_make_data.py", "--model", a.model_dir, "--root", a.root,
                       "--train-rows", a.train_rows, "--test-rows", a.test_rows], "setup.log", limits["data"])
        summary = a.root / "data_summary.json"
        if summary.exists():
            b.results["data"]["result"] = json.loads(summary.read_text())
            b.save()
    for name, backend, batch in (("unsloth", "unsloth", a.unsloth_batch), ("hf", "hf", a.hf_batch)):
        if f"train_{name}" in phases:
            res = b.a.root / f"train_{name}.json"
            res.unlink(missing_ok=True)
            b.run(f"train_{name}", [PY, "bench/gpu_train_speed.py", "--result", res, "--name", name, "--",
                                    *train_args(b, name, backend, batch)], f"train_{name}.log",
                  limits[f"train_{name}"], res, min_needed=60)
    jobs = {
        "infer_seven_hf": lambda: ["seven", "--", *infer_seven_args(b, "seven_hf", "hf", b.adapter("hf"), True)],
        "infer_plain": lambda: ["plain", "--model", a.model_dir, "--adapter", b.adapter("hf") or "",
                                "--jsonl", b.work / "jsonl" / "test.jsonl", "--batch-size", 64],
        "infer_seven_hf_free": lambda: ["seven", "--", *infer_seven_args(b, "seven_hf_free", "hf", b.adapter("hf"),
                                                                         False)],
        "infer_seven_unsloth": lambda: ["seven", "--", *infer_seven_args(b, "seven_unsloth", "unsloth",
                                                                         b.adapter("unsloth"), True)],
    }
    for name, make in jobs.items():
        if name in phases:
            res = b.a.root / f"{name}.json"
            res.unlink(missing_ok=True)
            argv = make()
            cmd = [PY, "bench/gpu_infer_speed.py", argv[0], "--result", res, "--name", name, *argv[1:]]
            b.run(name, cmd, "infer.log", limits.get(name, limits["infer"]), res, min_needed=45)
    compare(b)
    text = table(b)
    (b.out / "summary.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
