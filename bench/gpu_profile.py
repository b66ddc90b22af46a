"""Profile stage 6's training steps or stage 7's batches as they run: GPU busy share, what the host did while the
GPU waited, and every host<->GPU synchronization with the code that caused it.

    python bench/gpu_profile.py train --out DIR -- <6_train.py options>
    python bench/gpu_profile.py infer --out DIR -- <7_infer.py options>

After --skip steps (train) or batches (infer) of warm-up (compilation, allocator growth):
  1. --units of them under torch.profiler (CPU + CUDA, no Python stacks): GPU busy share and idle gaps
     (bench/trace_gaps.py), the trace kept as DIR/{mode}_trace.json.gz. For training the --units steps are one
     window, from the first one's on_step_begin until the last one's kernels have finished, batch fetching in
     between included and no sync inside; the profiler starts a step earlier, so that the window opens with
     the GPU still working as in steady state. An infer unit is one batch's predict call;
  2. one more with Python stacks, to charge each idle gap to the pipeline code running on the host then;
  3. one more under torch.cuda.set_sync_debug_mode("warn"): each synchronizing call, counted by call site.
For infer, every model forward (or static decoder step, CUDA-graphed or not) is also timed with CUDA events: the
first of a batch is the prefill, the rest are decode steps (the static decoder's count includes the one step it
queues before learning that every row has ended), with the warm-up batch and the profiled ones left out of the medians. Writes
DIR/{mode}_profile.json (under torchrun, rank R > 0 adds .rankR to every file name). Infer mode removes
WORK_DIR/infer_{split}/ first (its part files too), so that every batch is computed.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_results import load_stage  # noqa: E402
from trace_gaps import analyse  # noqa: E402


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Phases:
    """Steps the profiled run through: plain (warm-up), profiled, profiled with stacks, sync census, plain."""

    def __init__(self, out: Path, mode: str, skip: int, units: int):
        self.out, self.mode, self.skip, self.units = out, mode, skip, units
        self.continuous = mode == "train"  # one window over consecutive steps (see the module's docstring)
        rank = int(os.environ.get("RANK", 0))
        self.suffix = f".rank{rank}" if rank else ""
        self.n, self.prof, self.range = 0, None, None
        self.syncs, self.report = collections.Counter(), {}
        self.window = f"{mode}_unit"

    def _profiler(self, stacks: bool, drain: bool = True):
        import torch
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        p = profile(activities=activities, with_stack=stacks)
        p.start()
        if drain:
            sync()
        return p

    def begin(self):
        import torch
        i = self.n - self.skip
        if i == (-1 if self.continuous else 0):
            self.prof = self._profiler(False, drain=not self.continuous)
        elif i == self.units:
            self.prof = self._profiler(True)
        elif i == self.units + 1:
            sync()
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")
        if 0 <= i <= self.units and self.range is None:
            self.range = torch.autograd.profiler.record_function(self.window)
            self.range.__enter__()

    def end(self):
        import torch
        i = self.n - self.skip
        last = i == self.units - 1 or i == self.units
        if last:
            sync()  # the window ends when its kernels do
        if self.range is not None and (last or not self.continuous):
            self.range.__exit__(None, None, None)
            self.range = None
        if last:
            self.prof.stop()
            name = "plain" if i < self.units else "with_stacks"
            path = self.out / f"{self.mode}_trace{'' if i < self.units else '_stacks'}{self.suffix}.json"
            self.prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text())["traceEvents"]
            self.report[name] = analyse(events, self.window)
            if i < self.units:
                with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
            path.unlink()
            self.prof = None
        elif i == self.units + 1:
            sync()
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode(0)
            self.report["syncs_in_one_unit"] = sum(self.syncs.values())
            self.report["sync_sites"] = [{"site": k, "count": v} for k, v in self.syncs.most_common(25)]
        self.n += 1

    def on_warning(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return _show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if any(k in f.filename for k in (
            "common/", "transformers/", "peft/", "trl/", "accelerate/", "torch/optim", "torch/nn/utils", "unsloth"))]
        site = " < ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}:{f.name}" for f in frames[-2:][::-1])
        self.syncs[site or "(outside the pipeline's code)"] += 1


_show = warnings.showwarning


def mark():
    """A point on the GPU's timeline (a CUDA event), or the host clock where there is no GPU."""
    import torch
    if not torch.cuda.is_available():
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def ms(start, end) -> float:
    return start.elapsed_time(end) if hasattr(start, "elapsed_time") else (end - start) * 1e3


def run_train(argv: list[str], phases: Phases) -> dict:
    from transformers import TrainerCallback
    stage6 = load_stage("6_train.py")
    import common.model.training as ct
    from common import options

    class Hook(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            phases.begin()

        def on_step_end(self, *a, **kw):
            phases.end()

    class ProfiledTrainer(ct.PriceTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(Hook())

    ct.PriceTrainer = ProfiledTrainer
    stats = stage6.main(options.parse(stage6.TrainOptions, argv))
    return {"backend": stats.get("backend")}


def run_infer(argv: list[str], phases: Phases) -> dict:
    stage7 = load_stage("7_infer.py")
    import common.model.inference as ci
    import common.model.predict as cp
    from common import options
    cfg = options.parse(stage7.InferOptions, argv)
    shutil.rmtree(cfg.work_dir / f"infer_{cfg.split}", ignore_errors=True)
    import torch

    import common.speed.decode as cd
    forwards: list[list] = []  # per batch: [(start event, end event)] for each model forward or decode step
    hooked: set[int] = set()
    in_step = []  # a static decoder's step is timed as one unit, whether replayed or run eagerly

    def quiet() -> bool:  # no events while a CUDA graph is being captured (nor inside a timed step)
        return bool(in_step) or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())

    def timed(model):
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        if id(core) in hooked:
            return
        hooked.add(id(core))

        def pre(_m, _a):
            if not quiet():
                forwards[-1].append([mark(), None])

        def post(_m, _a, _o):
            if not quiet():
                forwards[-1][-1][1] = mark()

        core.register_forward_pre_hook(pre)
        core.register_forward_hook(post)

    def timed_unit(call):  # a static decoder's prefill or step, timed as one unit (its own forwards stay quiet)
        def run(self, *args):
            start = mark()
            in_step.append(1)
            try:
                out = call(self, *args)
            finally:
                in_step.pop()
            forwards[-1].append([start, mark()])
            return out
        return run

    capture = cd.DecodeStep._capture

    def quiet_capture(self):  # its warm-up forward is not a batch's prefill
        in_step.append(1)
        try:
            capture(self)
        finally:
            in_step.pop()

    cd.DecodeStep.prefill = timed_unit(cd.DecodeStep.prefill)
    cd.DecodeStep.__call__ = timed_unit(cd.DecodeStep.__call__)
    cd.DecodeStep._capture = quiet_capture
    inner = cp.predict_batch

    def profiled_predict(model, tokenizer, batch, **kw):
        timed(model)
        forwards.append([])
        phases.begin()
        out = inner(model, tokenizer, batch, **kw)
        sync()
        phases.end()
        return out

    ci.predict_batch = profiled_predict
    stats = stage7.main(cfg)
    sync()
    profiled = range(phases.skip, phases.skip + phases.units + 2)  # under the profiler or in sync-debug mode
    plain = [f for i, f in enumerate(forwards) if i and i not in profiled and f]
    prefill = [ms(*f[0]) for f in plain]
    decode = [ms(s, e) for f in plain for s, e in f[1:]]
    steps = [len(f) - 1 for f in plain]
    med = (lambda xs: round(sorted(xs)[len(xs) // 2], 2) if xs else None)
    return {"backend": stats.get("backend"), "batches": len(forwards), "prefill_ms_median": med(prefill),
            "decode_step_ms_median": med(decode), "decode_steps_per_batch_median": med(steps),
            "forward_ms_per_batch_median": med([sum(ms(s, e) for s, e in f) for f in plain]),
            "batches_in_medians": len(plain)}


def main() -> None:
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["train", "infer"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip", type=int, default=8, help="warm-up steps/batches before profiling")
    ap.add_argument("--units", type=int, default=2, help="steps/batches profiled without stacks")
    args = ap.parse_args(sys.argv[1:cut])
    import torch
    args.out.mkdir(parents=True, exist_ok=True)
    phases = Phases(args.out, args.mode, args.skip, args.units)
    warnings.showwarning = phases.on_warning
    warnings.filterwarnings("always", message=".*synchroniz.*")
    started = time.time()
    result = (run_train if args.mode == "train" else run_infer)(sys.argv[cut + 1:], phases)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"mode": args.mode, "device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "argv": sys.argv[cut + 1:], "skip": args.skip, "units": args.units,
              "seconds": round(time.time() - started, 1), **result, **phases.report}
    (args.out / f"{args.mode}_profile{phases.suffix}.json").write_text(json.dumps(result, indent=1))
    print("PROFILE", json.dumps({k: result.get(k) for k in ("mode", "prefill_ms_median", "decode_step_ms_median",
                                                             "syncs_in_one_unit")}), flush=True)
    for name in ("plain", "with_stacks"):
        r = result.get(name) or {}
        print(f"PROFILE {name}: busy {r.get('gpu_busy_pct')}% of {r.get('wall_ms')} ms", flush=True)


if __name__ == "__main__":
    main()
