"""Training speed of stage 6 as it is (`6_train.py`'s main(), its Trainer, loader and collator), per backend.

One run = one process (importing Unsloth patches transformers process-wide, so backends never share one):

    python bench/gpu_train_speed.py --result R.json -- --work-dir W --model M --backend unsloth --batch-size 16 ...

    torchrun --standalone --nproc_per_node 2 bench/gpu_train_speed.py --result R.json -- ...   (rank 0 writes)

The arguments after `--` go to 6_train.py unchanged. A callback added to its PriceTrainer times every
optimizer step with the GPU synchronized: `step` = on_step_begin -> on_step_end, `interval` = from one step's
end to the next (data wait included; an interval that holds an evaluation is left out). The first
--warmup steps (Unsloth compiles in its first) are left out of the medians. Peak GPU memory is
torch.cuda.max_memory_allocated() over the training steps, the weights included; an evaluation's
generation is measured apart. The result JSON is written when training ends, before 6_train's final
evaluation, and again with that evaluation once main() returns. `steady_epoch_s` is the wall-clock window
of the timed steps (time.time()), for matching against GPU-utilization samples taken outside.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_results import arg_value, load_stage  # noqa: E402


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "unsloth", "unsloth_zoo", "bitsandbytes", "trl"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def make_timer(result_path: Path, meta: dict, warmup: int):
    import torch
    from transformers import TrainerCallback
    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.logs, self.evals = [], [], []
            self.t_begin = self.t_prev_end = None
            self.after_eval = False
            self.train_peak = 0
            self.result = dict(meta)

        def on_train_begin(self, args, state, control, **kw):
            sync()
            if cuda:
                self.result["memory_before_train_gib"] = gib(torch.cuda.memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            self.t_train = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            now = time.perf_counter()
            if len(self.steps) == warmup:
                self.result["steady_start_epoch"] = time.time()
            self.steps.append({"step": state.global_step, "step_s": now - self.t_begin,
                               "interval_s": None if self.t_prev_end is None or self.after_eval
                               else now - self.t_prev_end})
            self.t_prev_end, self.after_eval = now, False
            if cuda:
                self.train_peak = max(self.train_peak, torch.cuda.max_memory_allocated())
                self.result["train_peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
            if len(self.steps) % 5 == 0:  # partial results, in case a later phase hangs or is killed
                self.summarize(args, state, now)
                self.write()

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append({"step": state.global_step, **(logs or {})})

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            sync()
            now = time.perf_counter()
            since = getattr(self, "t_end", None) or self.t_prev_end  # after training: since its end
            ev = {"step": state.global_step, "seconds": round(now - since, 2), "at": now, "metrics": metrics}
            if cuda:
                ev["peak_gib"] = gib(torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            self.evals.append(ev)
            self.after_eval = True
            self.result["evals"] = [{k: v for k, v in e.items() if k != "at"} for e in self.evals]
            self.write()

        def on_train_end(self, args, state, control, **kw):
            sync()
            self.t_end = time.perf_counter()
            self.result["steady_end_epoch"] = time.time()
            self.summarize(args, state, self.t_end)
            self.result["train_finished"] = True
            self.write()

        def summarize(self, args, state, end: float):
            world = int(os.environ.get("WORLD_SIZE", 1))
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
            timed = self.steps[warmup:]
            step_s = [s["step_s"] for s in timed]
            interval_s = [s["interval_s"] for s in timed if s["interval_s"] is not None]
            losses = [x["loss"] for x in self.logs if "loss" in x]
            r = self.result
            r.update({
                "samples_per_step": per_step, "steps_done": state.global_step, "warmup_steps": warmup,
                "timed_steps": len(timed), "first_step_s": round(self.steps[0]["step_s"], 2) if self.steps else None,
                "median_step_s": round(statistics.median(step_s), 4) if step_s else None,
                "median_interval_s": round(statistics.median(interval_s), 4) if interval_s else None,
                "train_wall_s": round(end - self.t_train, 1),
                "losses": losses, "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "all_losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
                "step_times_s": [round(s["step_s"], 3) for s in self.steps],
            })
            if interval_s:
                r["samples_per_s"] = round(per_step / statistics.median(interval_s), 2)
            if step_s:
                r["samples_per_s_compute"] = round(per_step / statistics.median(step_s), 2)
            if cuda:
                r["train_peak_gib"] = gib(self.train_peak)

        def write(self):
            if int(os.environ.get("RANK", 0)) == 0:
                result_path.write_text(json.dumps(self.result, indent=1, default=str))

    return StepTimer()


def main() -> None:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    cut = sys.argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--name", default="")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(sys.argv[1:cut])
    train_argv = sys.argv[cut + 1:]
    started = time.time()
    backend = arg_value(train_argv, "--backend", "auto")
    if backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as 6_train.py does for this backend)
    import torch
    stage6 = load_stage("6_train.py")
    import common.training as ct
    from common import options

    meta = {"name": args.name, "backend_requested": backend, "argv": train_argv, "versions": versions(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    timer = make_timer(args.result, meta, args.warmup)

    class TimedTrainer(ct.PriceTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(timer)
            timer.result["model_load_s"] = round(time.time() - started, 1)

    ct.PriceTrainer = TimedTrainer
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        # 6_train logs to TensorBoard (requirements.txt installs it); a machine without it could not run
        # stage 6 at all, so leave that logging out here and say so.
        make_args = stage6.training_arguments

        def without_tensorboard(*a, **kw):
            targs = make_args(*a, **kw)
            targs.report_to = []
            return targs

        stage6.training_arguments = without_tensorboard
        timer.result["note"] = "tensorboard not installed: report_to=[] for this run"
    cfg = options.parse(stage6.TrainOptions, train_argv)
    stats = stage6.main(cfg)
    r = timer.result
    r.update({"backend": stats.get("backend"), "final_eval": stats.get("final_eval"),
              "stats_seconds": stats.get("seconds"), "total_s": round(time.time() - started, 1),
              "adapter_dir": str(cfg.out), "saved": (cfg.out / "COMPLETE").exists()})
    timer.write()
    if int(os.environ.get("RANK", 0)) != 0:
        return
    print("RESULT", json.dumps({k: r.get(k) for k in ("name", "backend", "samples_per_s", "median_interval_s",
                                                      "median_step_s", "train_peak_gib", "loss_first", "loss_last",
                                                      "all_losses_finite", "first_step_s")}), flush=True)


if __name__ == "__main__":
    main()
