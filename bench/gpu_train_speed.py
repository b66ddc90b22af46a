"""Training speed of stage 6 as it is (`6_train.py`'s main(), its Trainer, loader and collator), per backend.

One run = one process (importing Unsloth patches transformers process-wide, so backends never share one):

    python bench/gpu_train_speed.py --result R.json -- --work-dir W --model M --backend unsloth --batch-size 16 ...

    torchrun --standalone --nproc_per_node 2 bench/gpu_train_speed.py --result R.json -- ...   (rank r > 0: R.rank{r}.json)

The arguments after `--` go to 6_train.py unchanged. A callback added to its PriceTrainer marks every
optimizer step's begin and end with CUDA events, which wait for nothing: the host runs ahead of the GPU as it
does in 6_train.py alone. Read on the GPU's timeline, `step` = on_step_begin -> on_step_end, `interval` =
from one step's end to the next (data wait included; an interval that holds an evaluation is left out);
`samples_per_s` is from the median interval, `samples_per_s_window` from the whole timed window. The first
--warmup steps (Unsloth compiles in its first) are left out. Each step's loss (this rank's) is kept as a
tensor and read once training ends. Peak GPU memory is torch.cuda.max_memory_allocated() over the training
steps, the weights included; an evaluation's generation is measured apart. The result JSON is written when
training ends, before 6_train's final evaluation, and again with that evaluation once main() returns.
`steady_start_epoch`/`steady_end_epoch` bound the timed steps in wall-clock time (time.time()), for matching
against GPU-utilization samples taken outside: the end is when the last step ended on the GPU (until commit
5783b44 it was when training ended, after the Trainer's closing checkpoint, which moved the window up to ~1.5 s
past the steps, onto an idle GPU).

Each timed step is also cut at its forward's end, its backward's end (under DDP: after the last gradient
all-reduce), the gradient clipping's end and the optimizer's end (`segments_ms`, medians; one micro-step per
step only): the GPU time each part takes, with `handover` = from the previous step's end to this step's begin.
Under torchrun each rank also times a lone all-reduce of all its trainable gradients (`allreduce_ms`).
`samples_per_s_repeated_lengths`: from the median interval over the timed steps whose padded length came twice
before (CUDA graphs warm up and record on a length's first two steps, then replay).
`--sample-stacks FILE` samples the host's Python stacks every `--sample-every` seconds into FILE, each step's
begin marked (bench/stack_samples.py reads it back).
Garbage collections during training are logged by step: each full one with its host ms (`gc_full`), the young
ones counted and summed per step (`gc_young`); `gc_full_ms_timed`: the full ones' sum over the timed steps.
"""
from __future__ import annotations

import argparse
import gc
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

    def mark():
        """A point on the GPU's stream (a CUDA event: recording one does not wait), or the host clock."""
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def reached(m) -> bool:
        return m.query() if cuda else True

    def seconds(a, b) -> float:
        return a.elapsed_time(b) / 1e3 if cuda else b - a

    class StepTimer(TrainerCallback):
        """Times steps without waiting for the GPU: a host sync per step would leave the GPU idle while the host
        prepares the next step, which 6_train.py on its own never does (it overlaps the two)."""

        def __init__(self):
            self.begins, self.ends, self.after_eval_flags, self.loss_tensors, self.logs, self.evals = \
                [], [], [], [], [], []
            self.batch_shapes = []  # (rows, padded length) per step: how evenly the ranks' steps cost
            self.gc_full, self.gc_young = [], []
            self.cuts = {"forward": [], "backward": [], "clip": [], "optimizer": []}  # each step's part ends
            self.after_eval = False
            self.train_peak = 0
            self.result = dict(meta)
            self.mark = mark
            self.sampler = None  # a stack_samples.Sampler, to mark each step's begin in its file

        def on_train_begin(self, args, state, control, **kw):
            gc.callbacks.append(self.record_gc)
            sync()
            if cuda:
                self.result["memory_before_train_gib"] = gib(torch.cuda.memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            self.t_train = time.perf_counter()

        def record_gc(self, phase, info):
            """Garbage collections during training, on the host, by step (0 = before the first step ends):
            each full one as [step, ms], the young ones (a few a step) as [step, count, ms] per step."""
            if phase == "start":
                self.gc_start = time.perf_counter()
                return
            step, ms = len(self.ends), 1e3 * (time.perf_counter() - self.gc_start)
            if info["generation"] == 2:
                self.gc_full.append([step, round(ms, 1)])
            elif self.gc_young and self.gc_young[-1][0] == step:
                self.gc_young[-1][1] += 1
                self.gc_young[-1][2] = round(self.gc_young[-1][2] + ms, 2)
            else:
                self.gc_young.append([step, 1, round(ms, 2)])

        def on_step_begin(self, args, state, control, **kw):
            if self.sampler:
                self.sampler.step(len(self.begins))
            self.begins.append(mark())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(mark())
            self.after_eval_flags.append(self.after_eval)
            self.after_eval = False
            self.t_eval_from = time.perf_counter()
            if len(self.ends) == warmup:  # host time, refined from the GPU's events when training ends
                self.result["steady_start_epoch"] = time.time()
            if cuda:
                self.train_peak = max(self.train_peak, torch.cuda.max_memory_allocated())
                self.result["train_peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
            if len(self.ends) % 5 == 0:  # partial results, in case a later phase hangs or is killed
                self.summarize(args, state, time.perf_counter(), final=False)
                self.write()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.cuts["clip"].append(mark())

        def on_optimizer_step(self, args, state, control, **kw):
            self.cuts["optimizer"].append(mark())

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append({"step": state.global_step, **(logs or {})})

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            sync()
            now = time.perf_counter()
            ev = {"step": state.global_step, "seconds": round(now - getattr(self, "t_eval_from", now), 2),
                  "metrics": metrics}
            if cuda:
                ev["peak_gib"] = gib(torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            self.evals.append(ev)
            self.after_eval = True
            self.result["evals"] = self.evals
            self.write()

        def on_train_end(self, args, state, control, model=None, **kw):
            gc.callbacks.remove(self.record_gc)
            if self.sampler:
                self.sampler.stop()
            now = mark()
            sync()
            # the wall-clock time the last step ended on the GPU: the Trainer's closing save (and this
            # callback's own work) come after it, with the GPU idle, and are no part of the steady window
            last_step_end = time.time() - (seconds(self.ends[-1], now) if self.ends else 0.0)
            if cuda and int(os.environ.get("WORLD_SIZE", 1)) > 1 and model is not None:
                self.result["allreduce_ms"] = time_allreduce(model)
            self.t_end = self.t_eval_from = time.perf_counter()
            self.summarize(args, state, self.t_end, final=True)
            self.result["steady_end_epoch"] = last_step_end
            if len(self.ends) > warmup:
                self.result["steady_start_epoch"] = self.result["steady_end_epoch"] - seconds(
                    self.ends[warmup - 1] if warmup else self.begins[0], self.ends[-1])
            self.result["train_finished"] = True
            self.write()

        def summarize(self, args, state, end: float, final: bool):
            world = int(os.environ.get("WORLD_SIZE", 1))
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
            done = len(self.ends)
            while done and not final and not reached(self.ends[done - 1]):
                done -= 1
            step_s = [seconds(self.begins[k], self.ends[k]) for k in range(done)]
            interval_s = [None if k == 0 or self.after_eval_flags[k] else seconds(self.ends[k - 1], self.ends[k])
                          for k in range(done)]
            timed_steps = step_s[warmup:]
            timed_intervals = [x for x in interval_s[warmup:] if x is not None]
            r = self.result
            r.update({
                "samples_per_step": per_step, "steps_done": state.global_step, "warmup_steps": warmup,
                "timed_steps": len(timed_steps), "first_step_s": round(step_s[0], 2) if step_s else None,
                "median_step_s": round(statistics.median(timed_steps), 4) if timed_steps else None,
                "median_interval_s": round(statistics.median(timed_intervals), 4) if timed_intervals else None,
                "train_wall_s": round(end - self.t_train, 1),
                "step_times_s": [round(x, 3) for x in step_s],
                "interval_times_s": [None if x is None else round(x, 3) for x in interval_s],
                "logged_losses": [x["loss"] for x in self.logs if "loss" in x],
                "batch_shapes": self.batch_shapes, "rank": int(os.environ.get("RANK", 0)),
                "gc_full": self.gc_full, "gc_young": self.gc_young,
                "gc_full_ms_timed": round(sum(ms for step, ms in self.gc_full if warmup <= step < done), 1),
            })
            if final and self.loss_tensors:
                # each step's own loss (this rank's), read once at the end: reading it per step would sync
                losses = torch.stack([x.float().reshape(()) for x in self.loss_tensors]).tolist()
                r.update({"losses": losses, "loss_first": losses[0], "loss_last": losses[-1],
                          "all_losses_finite": all(x == x and abs(x) != float("inf") for x in losses)})
            segments = step_segments(self.begins, self.ends, self.cuts, warmup, done, seconds)
            if segments:
                r["segments_ms"] = segments
            if timed_intervals:
                r["samples_per_s"] = round(per_step / statistics.median(timed_intervals), 2)
                if len(timed_intervals) == len(timed_steps):  # no evaluation inside the window
                    window = seconds(self.ends[warmup - 1] if warmup else self.begins[0], self.ends[done - 1])
                    r["samples_per_s_window"] = round(per_step * len(timed_steps) / window, 2)
            repeats = repeated_length_intervals(self.batch_shapes, interval_s, warmup, done)
            if repeats and args.gradient_accumulation_steps == 1:
                r["samples_per_s_repeated_lengths"] = round(per_step / statistics.median(repeats), 2)
                r["repeated_length_steps"] = len(repeats)
            if timed_steps:
                r["samples_per_s_compute"] = round(per_step / statistics.median(timed_steps), 2)
            if cuda:
                r["train_peak_gib"] = gib(self.train_peak)

        def write(self):
            rank = int(os.environ.get("RANK", 0))
            path = result_path if rank == 0 else result_path.with_suffix(f".rank{rank}.json")
            path.write_text(json.dumps(self.result, indent=1, default=str))

    def time_allreduce(model) -> dict:
        """A lone all-reduce of this rank's trainable gradients' size (fp32), as DDP's buckets carry them."""
        import torch.distributed as dist
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        grads = torch.zeros(numel, dtype=torch.float32, device="cuda")
        times = []
        for k in range(13):
            dist.barrier()
            begin = mark()
            dist.all_reduce(grads)
            end = mark()
            torch.cuda.synchronize()
            if k >= 3:
                times.append(seconds(begin, end) * 1e3)
        return {"mb": round(numel * 4 / 2**20, 1), "median_ms": round(statistics.median(times), 3),
                "min_ms": round(min(times), 3)}

    return StepTimer()


def repeated_length_steps(shapes: list, intervals: list, warmup: int, done: int) -> list[int]:
    """The timed steps (indices) whose padded length came at least twice before. Under --cuda-graphs a length's
    first step runs the compiled kernels to warm up and its second records the graphs; from the third on they
    replay. A real run's thousands of steps meet a few dozen lengths, so nearly all of its steps are such."""
    seen: dict[int, int] = {}
    out = []
    for k, (rows, length) in enumerate(shapes[:done]):
        if k >= warmup and seen.get(length, 0) >= 2 and intervals[k] is not None:
            out.append(k)
        seen[length] = seen.get(length, 0) + 1
    return out


def repeated_length_intervals(shapes: list, intervals: list, warmup: int, done: int) -> list[float]:
    """The intervals of `repeated_length_steps`."""
    return [intervals[k] for k in repeated_length_steps(shapes, intervals, warmup, done)]


def step_segments(begins, ends, cuts, warmup: int, done: int, seconds) -> dict | None:
    """Median GPU ms of each part of the timed steps (handover, forward, backward, clip, optimizer, rest), read from
    the events that cut them; None when the cuts do not line up one per step (gradient accumulation)."""
    order = ["forward", "backward", "clip", "optimizer"]
    if done <= warmup or any(len(cuts[name]) < done for name in order):
        return None
    parts = {name: [] for name in ["handover", *order, "rest"]}
    for k in range(max(warmup, 1), done):
        marks = [ends[k - 1], begins[k], *(cuts[name][k] for name in order), ends[k]]
        for name, a, b in zip(parts, marks, marks[1:]):
            parts[name].append(seconds(a, b) * 1e3)
    return {name: round(statistics.median(v), 2) for name, v in parts.items() if v}


def main() -> None:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    cut = sys.argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--name", default="")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sample-stacks", type=Path, help="write every thread's Python stack to this file every "
                    "--sample-every seconds, with the steps' begins marked (bench/stack_samples.py reads it)")
    ap.add_argument("--sample-every", type=float, default=0.1)
    args = ap.parse_args(sys.argv[1:cut])
    train_argv = sys.argv[cut + 1:]
    started = time.time()
    backend = arg_value(train_argv, "--backend", "auto")
    if backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as 6_train.py does for this backend)
    import torch
    stage6 = load_stage("6_train.py")
    import common.model.training as ct
    from common import options

    meta = {"name": args.name, "backend_requested": backend, "argv": train_argv, "versions": versions(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    timer = make_timer(args.result, meta, args.warmup)
    if args.sample_stacks:
        from stack_samples import Sampler
        timer.sampler = Sampler(args.sample_stacks, args.sample_every)

    class TimedTrainer(ct.PriceTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(timer)
            timer.result["model_load_s"] = round(time.time() - started, 1)

        def training_step(self, model, inputs, *a, **kw):
            timer.batch_shapes.append(list(inputs["input_ids"].shape))
            loss = super().training_step(model, inputs, *a, **kw)
            timer.cuts["backward"].append(timer.mark())
            timer.loss_tensors.append(loss.detach())
            return loss

        def compute_loss(self, *a, **kw):
            out = super().compute_loss(*a, **kw)
            timer.cuts["forward"].append(timer.mark())
            return out

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
