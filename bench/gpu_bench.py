"""One device call: build the random 3B model and a realistic work folder, then time training and inference,
each baseline beside ours in the same call.

Phases (each its own process, each with a time limit inside one overall deadline, so that one failure or
hang does not cost the others; results go to OUT/results.json as each phase ends):

  build            bench/gpu_build_model.py: Qwen2.5-VL-3B's shape, random weights, bf16, real tokenizer
  data             bench/gpu_make_data.py: real catalog text, drawn 448 px images, stages 3-5
  train_hf         baseline: 6_train.py --backend hf, bf16, batch --hf-batch, per-window vision attention,   } bench/
                   logits at every position, no length grouping (transformers+peft as the library gives it)  } gpu_
  train_fast       ours: 6_train.py --backend hf, bf16, batch --fast-batch --group-by-length, otherwise its      } train_
                   defaults (bucketed vision attention, answer-only logits, compile, uint8 pixels)           } speed
  train_fast_2gpu  ours under torchrun --nproc_per_node 2 (same per-GPU batch)                               } .py
  train_fast_2gpu_stock   the same with DDP as PyTorch sets it up: buffers broadcast before every forward,     }
                          gradients copied into the all-reduce buckets and back                            }
  train_fast_2gpu_bucket  the same with --ddp-bucket-mb 256: one gradient all-reduce after the backward      }
  train_fast_2gpu_split   the same with --ddp-split-graphs: compiled blocks cut at DDP's bucket edges        }
  train_fast_big   train_fast at batch --fast-big-batch                                                       }
  train_fast_autogc  train_fast with --gc-every 0: Python's automatic garbage collector left on              }
  train_fast_masked  train_fast with --padding-mask: a 4-D padding mask (SDPA's memory-efficient kernel)      }
  train_fast_unpadded  train_fast with --vision-mlp-multiple 0: the vision MLP's width as the model has it    }
  train_fast_cpp   train_fast with TORCHINDUCTOR_CPP_WRAPPER=1: the compiled blocks launch their kernels from     }
                   C++ instead of Python, for the launch-bound steps                                          }
  train_fast_graphs  train_fast with --cuda-graphs: each compiled block replayed as a CUDA graph, lengths     }
                     padded to a multiple of 32                                                               }
  train_fast_dynamic_floats  train_fast with --no-float-constants: the model's float attributes passed into     }
                     the compiled blocks as 0-d CPU tensors read with .item() (PyTorch's default; before     }
                     the default changed, phase train_fast_floats measured the other side)                  }
  train_fast_device_indices  train_fast with --no-host-vision-indices: the vision tower builds its indices on  }
                     the GPU each step, reading the grids back (from commit e3da4db to the fix in 18d516a,    }
                     every training run did so, the collator's indices ignored)                               }
  train_fast_ungrouped  train_fast with --lora-groups off: peft's LoRA layers one by one, not q/k/v and gate/up  }
                     as one GEMM group each (before the default changed, phase train_fast_lora_groups measured  }
                     the other side)                                                                           }
  train_unsloth    6_train.py --backend unsloth (4-bit), batch --unsloth-batch
  train_unsloth16  6_train.py --backend unsloth --no-load-in-4bit (bf16 base), batch --unsloth-batch
  vision           bench/gpu_vision_speed.py: vision tower and prefill, per-window against bucketed
  floor            bench/gpu_prefill_floor.py: an inference prefill's matmuls and attention alone, bf16 and FP8
  infer_plain      baseline: a plain transformers generate loop, batch 64, train_hf's adapter  } bench/gpu_
  infer_fast       ours: 7_infer.py, its defaults, batch --infer-batch, same adapter           } infer_speed
  infer_fast_2gpu  ours under torchrun --nproc_per_node 2                                      } .py
  infer_fast_big   ours at batch --infer-big-batch (decode steps cost about the same at any batch)  }
  infer_fast_generate  infer_fast with --decode generate (the library's decode loop instead of CUDA graphs)  }
  infer_fast_mlp   infer_fast with --compile vision+mlp (the language model's MLPs and norms compiled too)     }
  infer_fast_unpadded  infer_fast with --vision-mlp-multiple 0 (the vision MLP's width as the model has it)   }
  infer_fast_dynamic_floats  infer_fast with --no-float-constants: the compiled vision blocks read the model's  }
                     floats as 0-d CPU tensors (PyTorch's default; before the default changed, phase          }
                     infer_fast_floats measured the other side)                                               }
  infer_free       7_infer.py --no-constrained (prediction equality with the plain loop)
  profile_train    bench/gpu_profile.py: train_fast's run with steps profiled (GPU busy, idle gaps, syncs)
  profile_infer    bench/gpu_profile.py: infer_fast's run with batches profiled
  profile_train_2gpu  profile_train under torchrun --nproc_per_node 2 (each rank's profile to its own files)

Any training phase with "_again" appended runs it once more, for A-B-A designs: a call's first training phase ran
~9 ms a step slower than its second whatever both ran (bench/RESULTS.md), so one order alone is biased.

GPU busy: nvidia-smi samples utilization.gpu every 200 ms through the whole call; each phase's mean over its
steady window (after warm-up, until its end) is reported per GPU.

    python bench/gpu_bench.py --out $OUT --deadline 560 --phases build,data,train_hf,train_fast
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import stack_samples  # noqa: E402

PY = sys.executable
ALL = ["build", "data", "train_hf", "train_fast", "train_fast_big", "train_fast_autogc", "train_fast_masked",
       "train_fast_unpadded", "train_fast_cpp", "train_fast_graphs", "train_fast_dynamic_floats",
       "train_fast_device_indices", "train_fast_ungrouped", "train_fast_2gpu",
       "train_fast_2gpu_stock", "train_fast_2gpu_bucket", "train_fast_2gpu_split", "train_unsloth", "train_unsloth16",
       "vision", "floor", "infer_plain", "infer_fast", "infer_fast_2gpu", "infer_fast_big", "infer_fast_generate",
       "infer_fast_mlp", "infer_fast_unpadded", "infer_fast_dynamic_floats", "infer_free", "profile_train",
       "profile_infer", "profile_train_2gpu"]
LIMITS = {"build": 120, "data": 120, "train": 150, "train_unsloth": 260, "vision": 120, "floor": 90, "infer": 110}
# the baseline: what transformers + peft do out of the box
LIBRARY_DEFAULTS = ["--vision-attention", "sdpa", "--loss-positions", "all", "--no-group-by-length", "--compile", "none",
                    "--cudnn-attention"]


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

    def run(self, name: str, cmd: list, log_name: str, limit: float, result_file: Path | None = None,
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
            ranks = sorted(result_file.parent.glob(result_file.stem + ".rank*.json"))
            if ranks:
                entry["other_ranks"] = [json.loads(p.read_text()) for p in ranks]
        if entry["status"] != "ok":
            entry["log_tail"] = (self.out / log_name).read_text()[-3000:]
        self.results[name] = entry
        self.save()
        print(f"   {name}: {entry['status']} in {entry['seconds']} s", flush=True)
        return entry.get("result")

    def adapter(self, name: str) -> Path | None:
        d = self.work / f"train_{name}"
        return d if (d / "COMPLETE").exists() else None


def util_samples(path: Path) -> dict[str, list[tuple[float, float]]]:
    """nvidia-smi's samples from UtilSampler's CSV: per GPU index, (epoch seconds, utilization %)."""
    per_gpu: dict[str, list[tuple[float, float]]] = {}
    for row in csv.reader(open(path)):
        try:
            when = dt.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            per_gpu.setdefault(row[1].strip(), []).append((when, float(row[2])))
        except (ValueError, IndexError):
            continue  # nvidia-smi's occasional "[N/A]" or a cut last line
    return per_gpu


def step_busy(points: list[tuple[float, float]], result: dict) -> list[float | None]:
    """nvidia-smi's mean utilization over each timed step of a training result, from the end of the step before
    to its own end (the steps' intervals chained from `steady_start_epoch`); None for a step no sample fell in.
    Empty where an interval is missing (an evaluation inside the window breaks the chain)."""
    intervals = (result.get("interval_times_s") or [])[result.get("warmup_steps", 0):]
    end = result.get("steady_start_epoch")
    if not end or not intervals or None in intervals:
        return []
    out = []
    for interval in intervals:
        begin, end = end, end + interval
        inside = [u for t, u in points if begin <= t <= end]
        out.append(round(sum(inside) / len(inside), 1) if inside else None)
    return out


class UtilSampler:
    """nvidia-smi's utilization.gpu (share of time a kernel ran) every 200 ms, to a CSV in OUT."""

    def __init__(self, path: Path):
        self.path = path
        self.proc = None
        if subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=open(path, "w"), stderr=subprocess.DEVNULL)

    def mean(self, start: float | None, end: float | None) -> dict | None:
        if self.proc is None or not start or not end or not self.path.exists():
            return None
        per_gpu = {k: [u for when, u in v if start <= when <= end] for k, v in util_samples(self.path).items()}
        return {f"gpu{k}": {"mean_util_pct": round(sum(v) / len(v), 1), "samples": len(v)}
                for k, v in sorted(per_gpu.items()) if v}

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()


def cpu_model() -> str:
    """The host CPU's model name: training steps are partly launch-bound, so the same GPU runs them at different
    speeds behind different hosts."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else "unknown"


def torchrun(gpus: int) -> list:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", gpus] if gpus > 1 else [PY]


def train_args(b: Bench, name: str, backend: str, batch: int, extra: list) -> list:
    a = b.a
    return ["--work-dir", b.work, "--model", a.model_dir, "--backend", backend, "--batch-size", batch,
            "--grad-accum", a.grad_accum, "--max-steps", a.steps, "--eval-steps", 0, "--eval-samples", 16,
            # the loss is logged every 10 steps, the stage's default (a log reads it back: one host sync)
            "--eval-batch-size", 16, "--save-steps", 100000, "--workers", 4,
            "--output-dir", b.work / f"train_{name}", "--overwrite",
            *(["--no-load-in-4bit"] if backend == "hf" else []), *extra]


def infer_seven_args(b: Bench, name: str, adapter: Path | None, batch: int, extra: list) -> list:
    args = ["--work-dir", b.work, "--data-dir", b.a.root / "dataset", "--split", "test", "--backend", "hf",
            "--batch-size", batch, "--workers", 4, "--output", b.a.root / f"{name}.csv", *extra]
    return args + (["--train-dir", adapter] if adapter else ["--adapter", "none", "--model", b.a.model_dir])


def same(p, q) -> bool:
    return (p is None and q is None) or (p is not None and q is not None and abs(p - q) < 1e-9)


def compare(b: Bench) -> None:
    got = {}
    for k, v in b.results.items():
        if k.startswith("infer_") and isinstance(v, dict) and v.get("result"):
            ranks = [v["result"], *v.get("other_ranks", [])]
            got[k] = {"predictions": v["result"].get("predictions"),
                      "texts": {i: t for r in ranks for i, t in (r.get("texts") or {}).items()}}
    out = {}
    for x, y in [("infer_plain", "infer_free"), ("infer_plain", "infer_fast"), ("infer_fast", "infer_fast_2gpu"),
                 ("infer_fast", "infer_fast_big"), ("infer_fast_generate", "infer_fast"),
                 ("infer_fast", "infer_fast_mlp"), ("infer_fast", "infer_fast_unpadded"),
                 ("infer_fast", "infer_fast_dynamic_floats")]:
        px, py = got.get(x, {}).get("predictions"), got.get(y, {}).get("predictions")
        if not px or not py:
            continue
        ids = sorted(set(px) & set(py))
        tx, ty = got[x].get("texts") or {}, got[y].get("texts") or {}
        out[f"{x} vs {y}"] = {"rows": len(ids), "equal_price": sum(same(px[i], py[i]) for i in ids),
                              "parsed_x": sum(px[i] is not None for i in ids),
                              "parsed_y": sum(py[i] is not None for i in ids),
                              "equal_text": sum(tx.get(i) is not None and tx.get(i) == ty.get(i) for i in ids)}
    b.results["equality"] = out
    b.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    ap.add_argument("--root", type=Path, default=Path("/tmp/gpu_bench"))
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen25vl3b-random"))
    ap.add_argument("--size", default="3b")
    ap.add_argument("--phases", default=",".join(ALL))
    ap.add_argument("--deadline", type=float, default=560, help="seconds for everything")
    ap.add_argument("--train-rows", type=int, default=640)
    ap.add_argument("--test-rows", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per training phase")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step in every training phase (6_train.py's default is 4; 1 "
                         "is the worst case for 2-GPU scaling: one gradient all-reduce per micro-batch)")
    ap.add_argument("--hf-batch", type=int, default=4)
    ap.add_argument("--fast-batch", type=int, default=16)
    ap.add_argument("--fast-big-batch", type=int, default=20)
    ap.add_argument("--unsloth-batch", type=int, default=16)
    ap.add_argument("--infer-batch", type=int, default=64)
    ap.add_argument("--infer-big-batch", type=int, default=256)
    ap.add_argument("--fast-extra", default="", help="extra 6_train.py options for train_fast*, e.g. '--compile none'")
    ap.add_argument("--sample-stacks", type=float, default=0, help="seconds between samples of the training phases' "
                    "Python stacks (bench/stack_samples.py; OUT/NAME.stacks.txt.gz and a record/replay profile in "
                    "results.json); 0: off")
    ap.add_argument("--limits", default="", help="seconds per phase or group (build, data, train, infer, vision, "
                    "floor, or a phase's name), e.g. 'train=200,infer_plain=130'; the rest keep their defaults")
    a = ap.parse_args()
    limits = {**LIMITS, **{k: float(v) for k, v in (x.split("=") for x in a.limits.split(",") if x)}}
    b = Bench(a)
    phases = a.phases.split(",")
    unknown = sorted({p.removesuffix("_again") if p.startswith("train_") else p for p in phases} - set(ALL))
    if unknown:
        raise SystemExit(f"unknown phases {unknown}; known: {ALL}")
    sampler = UtilSampler(b.out / "gpu_util.csv")
    env = {"device_info": subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
           if sampler.proc else "no nvidia-smi",
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": phases, "cpus": os.cpu_count(),
           "cpu_model": cpu_model(),
           "argv": sys.argv[1:]}
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
    fast = ["--group-by-length", *a.fast_extra.split()]
    trains = {"train_hf": ("hf", a.hf_batch, LIBRARY_DEFAULTS, 1), "train_fast": ("hf", a.fast_batch, fast, 1),
              "train_fast_big": ("hf", a.fast_big_batch, fast, 1),
              "train_fast_autogc": ("hf", a.fast_batch, [*fast, "--gc-every", 0], 1),
              "train_fast_masked": ("hf", a.fast_batch, [*fast, "--padding-mask"], 1),
              "train_fast_unpadded": ("hf", a.fast_batch, [*fast, "--vision-mlp-multiple", 0], 1),
              "train_fast_cpp": ("hf", a.fast_batch, fast, 1),
              "train_fast_graphs": ("hf", a.fast_batch, [*fast, "--cuda-graphs"], 1),
              "train_fast_dynamic_floats": ("hf", a.fast_batch, [*fast, "--no-float-constants"], 1),
              "train_fast_device_indices": ("hf", a.fast_batch, [*fast, "--no-host-vision-indices"], 1),
              "train_fast_ungrouped": ("hf", a.fast_batch, [*fast, "--lora-groups", "off"], 1),
              "train_fast_2gpu": ("hf", a.fast_batch, fast, 2),
              "train_fast_2gpu_stock": ("hf", a.fast_batch, [*fast, "--ddp-broadcast-buffers",
                                                             "--no-ddp-grads-in-buckets"], 2),
              "train_fast_2gpu_bucket": ("hf", a.fast_batch, [*fast, "--ddp-bucket-mb", 256], 2),
              "train_fast_2gpu_split": ("hf", a.fast_batch, [*fast, "--ddp-split-graphs"], 2),
              "train_unsloth": ("unsloth", a.unsloth_batch, [], 1),
              "train_unsloth16": ("unsloth", a.unsloth_batch, ["--no-load-in-4bit"], 1)}
    train_env = {"train_fast_cpp": ["TORCHINDUCTOR_CPP_WRAPPER=1"]}  # environment beyond the options

    def train(name: str) -> None:
        base = name.removesuffix("_again")
        backend, batch, extra, gpus = trains[base]
        res = a.root / f"{name}.json"
        for old in [res, *res.parent.glob(res.stem + ".rank*.json")]:
            old.unlink(missing_ok=True)
        env = ["env", *train_env[base]] if base in train_env else []
        stacks = a.root / f"{name}.stacks.txt"
        sampling = ["--sample-stacks", stacks, "--sample-every", a.sample_stacks] if a.sample_stacks else []
        cmd = [*env, *torchrun(gpus), "bench/gpu_train_speed.py", "--result", res, "--name", name, *sampling, "--",
               *train_args(b, name.removeprefix("train_"), backend, batch, extra)]
        got = b.run(name, cmd, f"{name}.log", limits.get(name, limits["train"]), res, min_needed=60)
        if got:
            b.results[name]["gpu_busy"] = sampler.mean(got.get("steady_start_epoch"), got.get("steady_end_epoch"))
            if gpus == 1 and sampler.path.exists():
                b.results[name]["step_busy"] = step_busy(util_samples(sampler.path).get("0", []), got)
            if sampling and stacks.exists():
                b.results[name]["stacks"] = stack_samples.summarize(stacks, got)
                with open(stacks, "rb") as raw, gzip.open(b.out / f"{name}.stacks.txt.gz", "wb") as packed:
                    shutil.copyfileobj(raw, packed)
            b.save()

    def vision(name: str) -> None:
        res = a.root / "vision.json"
        b.run("vision", [PY, "bench/gpu_vision_speed.py", "--model", a.model_dir, "--result", res], "vision.log",
              limits["vision"], res, min_needed=45)

    def floor(name: str) -> None:
        res = a.root / "floor.json"
        b.run("floor", [PY, "bench/gpu_prefill_floor.py", "--result", res], "floor.log", limits["floor"], res,
              min_needed=30)

    def infer(name: str) -> None:
        adapter = b.adapter("hf")
        gpus, argv = {
            "infer_plain": (1, ["plain", "--model", a.model_dir, "--adapter", adapter or "",
                                "--jsonl", b.work / "jsonl" / "test.jsonl", "--batch-size", 64]),
            "infer_fast": (1, ["seven", "--", *infer_seven_args(b, "fast", adapter, a.infer_batch, [])]),
            "infer_fast_2gpu": (2, ["seven", "--", *infer_seven_args(b, "fast_2gpu", adapter, a.infer_batch, [])]),
            "infer_fast_big": (1, ["seven", "--", *infer_seven_args(b, "fast_big", adapter, a.infer_big_batch, [])]),
            "infer_fast_generate": (1, ["seven", "--", *infer_seven_args(b, "fast_generate", adapter, a.infer_batch,
                                                                           ["--decode", "generate"])]),
            "infer_fast_mlp": (1, ["seven", "--", *infer_seven_args(b, "fast_mlp", adapter, a.infer_batch,
                                                                      ["--compile", "vision+mlp"])]),
            "infer_fast_unpadded": (1, ["seven", "--", *infer_seven_args(b, "fast_unpadded", adapter, a.infer_batch,
                                                                           ["--vision-mlp-multiple", 0])]),
            "infer_fast_dynamic_floats": (1, ["seven", "--", *infer_seven_args(b, "fast_dynamic_floats", adapter,
                                                                                 a.infer_batch,
                                                                                 ["--no-float-constants"])]),
            "infer_free": (1, ["seven", "--", *infer_seven_args(b, "free", adapter, 64, ["--no-constrained"])]),
        }[name]
        res = a.root / f"{name}.json"
        for old in [res, *res.parent.glob(res.stem + ".rank*.json")]:
            old.unlink(missing_ok=True)
        cmd = [*torchrun(gpus), "bench/gpu_infer_speed.py", argv[0], "--result", res, "--name", name, *argv[1:]]
        got = b.run(name, cmd, "infer.log", limits.get(name, limits["infer"]), res, min_needed=45)
        if got:
            ranks = [got, *b.results[name].get("other_ranks", [])]
            b.results[name]["gpu_busy"] = sampler.mean(min(r.get("steady_start_epoch") or 0 for r in ranks) or None,
                                                       max(r.get("steady_end_epoch") or 0 for r in ranks) or None)
            b.results[name]["samples_per_s_all_ranks"] = round(sum(r.get("samples_per_s") or 0 for r in ranks), 2)
            b.save()

    def profile(name: str) -> None:
        mode = name.removeprefix("profile_").removesuffix("_2gpu")
        gpus = 2 if name.endswith("_2gpu") else 1
        argv = (train_args(b, name.removeprefix("train_"), "hf", a.fast_batch, fast) if mode == "train"
                else infer_seven_args(b, "profile", b.adapter("hf"), a.infer_batch, []))
        out = b.out / "2gpu" if gpus > 1 else b.out
        res = out / f"{mode}_profile.json"
        b.run(name, [*torchrun(gpus), "bench/gpu_profile.py", mode, "--out", out, "--skip", 8 if mode == "train" else 2,
                     "--", *argv], f"{name}.log", limits.get(name, limits["train" if mode == "train" else "infer"]),
              res, min_needed=45)

    for name in phases:  # in the order given
        if name.removesuffix("_again") in trains:
            train(name)
        elif name == "vision":
            vision(name)
        elif name == "floor":
            floor(name)
        elif name.startswith("infer_"):
            infer(name)
        elif name.startswith("profile_"):
            profile(name)
    sampler.stop()
    compare(b)
    print(json.dumps({k: {x: y for x, y in v.items() if x in ("status", "seconds", "gpu_busy")}
                      for k, v in b.results.items() if isinstance(v, dict) and "status" in v}, indent=1), flush=True)
    for k, v in b.results.items():
        x = (v.get("result") if isinstance(v, dict) else None) or {}
        if isinstance(x, dict) and "summary" in x and k == "floor":
            print("SUMMARY floor", json.dumps(x["summary"]), flush=True)
        if isinstance(x, dict) and ("samples_per_s" in x or "tower_speedup" in x):
            keys = ("samples_per_s", "samples_per_s_compute", "median_interval_s", "train_peak_gib", "loss_first",
                    "loss_last", "generate_samples_per_s", "peak_gib", "tower_speedup", "prefill_samples_per_s_sdpa",
                    "prefill_samples_per_s_bucketed", "tower_share_of_prefill_bucketed", "tower_speedup_compiled",
                    "prefill_samples_per_s_compiled", "tower_share_of_prefill_compiled",
                    "compiled_tower_max_abs_diff")
            print("SUMMARY", k, json.dumps({key: x.get(key) for key in keys if key in x}),
                  v.get("samples_per_s_all_ranks", ""), flush=True)
    print("equality", json.dumps(b.results.get("equality")), flush=True)


if __name__ == "__main__":
    main()
