"""bench/trace_gaps.py: GPU busy share and idle-gap attribution, on a trace whose answer is known."""
from __future__ import annotations

import gzip
import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from trace_gaps import analyse, load  # noqa: E402


def span(name, cat, ts, dur):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur}


def test_busy_share_and_gaps_charged_to_the_host_code_running_then(tmp_path):
    events = [
        span("train_unit", "user_annotation", 0, 1000), span("train_unit", "user_annotation", 2000, 500),
        span("other", "user_annotation", 5000, 100),
        # window 1: busy 0-300, 300-400 (overlapping streams), 600-1000; idle 400-600
        span("gemm", "kernel", 0, 300), span("norm", "kernel", 250, 150), span("copy", "gpu_memcpy", 600, 400),
        # window 2: idle 2000-2100, busy 2100-2400, idle 2400-2500
        span("gemm", "kernel", 2100, 300),
        span("kernel outside", "kernel", 3000, 900),  # outside every window: not counted
        # host frames: the trainer calls get_rope_index during the first gap
        span("transformers/trainer.py(1800): training_step", "python_function", 350, 400),
        span("transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py(955): get_rope_index", "python_function", 420, 200),
        span("site.py(1): unrelated", "python_function", 430, 10),
        span("transformers/trainer.py(1900): optimizer_step", "python_function", 1990, 600),
    ]
    r = analyse(events, "train_unit")
    assert r["windows"] == 2 and r["wall_ms"] == 1.5
    assert r["idle_ms"] == 0.4 and r["gpu_busy_pct"] == round(100 * 1.1 / 1.5, 1)
    assert r["kernels"] == 3  # the copy is a memcpy, the last kernel lies outside
    charged = {x["host"].split(" < ")[0].split(": ")[-1]: (x["ms"], x["gaps"]) for x in r["idle_charged_ms"]}
    assert charged == {"get_rope_index": (0.2, 1), "optimizer_step": (0.2, 2)}
    assert r["top_kernels_ms"][0] == {"kernel": "gemm", "ms": 0.6}
    assert r["kernel_kinds_ms"] == {"gemm": 0.6, "other": 0.15}
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    assert analyse(load(path), "train_unit") == r
    assert "error" in analyse(events, "no such window")


def test_prefill_flop_count_matches_the_models_own_linear_layers():
    """bench/prefill_flops.py's formula for the linear layers equals 2 x the parameters of the 3B model's
    nn.Linear layers (built on the meta device: shapes only) x the tokens each sees."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from gpu_build_model import config
    from prefill_flops import prefill_flops
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config("3b"))

    def linear_params(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    rows, tokens = 3, 100
    parts = prefill_flops(rows, tokens)
    lm = linear_params(model.model.language_model)
    assert abs(parts["language model linear"] * 1e12 - 2 * lm * rows * tokens) < 1e6
    visual = model.model.visual
    patches = (448 // 14) ** 2
    tower = (visual.patch_embed.proj.weight.numel() + linear_params(visual.blocks)) * patches
    merger = linear_params(visual.merger) * patches // 4
    assert abs(parts["vision tower linear"] * 1e12 - 2 * rows * (tower + merger)) < 1e6


def test_kernel_kinds_by_name():
    from trace_gaps import kernel_kind
    assert kernel_kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert kernel_kind("fmha_cutlassB_bf16_aligned_128x128_k128_sm80(PyTorchMemEffAttention") == "attention"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96") == "attention"
    assert kernel_kind("triton_poi_fused_add_mul_silu_5") == "fused (triton)"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<8, at::native::BinaryFunctor") == \
        "elementwise / copy (eager)"
    assert kernel_kind("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication (NCCL)"
    assert kernel_kind("void at::native::(anonymous namespace)::CatArrayBatchedCopy") == "elementwise / copy (eager)"
    assert kernel_kind("Memset (Device)") == "other"


def test_prefill_floor_times_every_linear_layer_of_the_prefill():
    """bench/gpu_prefill_floor.py's GEMM list covers the same matmul FLOPs as prefill_flops.py (checked above
    against the model's own layers), part by part."""
    from gpu_prefill_floor import attention_shapes, fused_shapes, gemm_shapes
    from prefill_flops import prefill_flops
    rows, tokens = 5, 333
    parts = prefill_flops(rows, tokens)
    flops = {"LM": 0, "vision": 0}
    for g in gemm_shapes(rows, tokens, vision_mlp_multiple=1):
        if "head" not in g["part"]:
            flops[g["part"].split()[0]] += 2 * g["M"] * g["K"] * g["N"] * g["calls"]
    assert abs(flops["LM"] - parts["language model linear"] * 1e12) < 1e6
    assert abs(flops["vision"] - parts["vision tower linear"] * 1e12) < 1e6
    padded = {g["part"]: g for g in gemm_shapes(rows, tokens)}
    for fused in fused_shapes(rows, tokens).values():  # one GEMM per group does the same multiply-adds
        replaced = sum(padded[part]["M"] * padded[part]["K"] * padded[part]["N"] * n
                       for part, n in fused["replaces"].items())
        assert fused["M"] * fused["K"] * fused["N"] * fused["calls"] == replaced
    assert padded["vision gate+up"]["N"] == padded["vision down"]["K"] == 3456  # as pad_vision_mlp lays it out
    attn = {a["part"].split()[0]: a for a in attention_shapes(rows, tokens)}
    assert attn["LM"]["calls"] == 36 and attn["LM"]["L"] == tokens and attn["LM"]["causal"]
    windows = [a for a in attention_shapes(rows, tokens) if a["part"].startswith("vision")]
    assert sum(a["calls"] for a in windows) == 32
    assert all(a["B"] * a["L"] == rows * 1024 for a in windows)  # every patch of every image in each block


def test_step_cost_fit_recovers_the_fixed_and_per_token_cost_of_the_slowest_rank():
    """perf_report.step_cost_fit: intervals made as 100 ms + 20 ms per 1,000 tokens of the longer rank's batch,
    with a recompile among them, give back those costs, leave the recompile out and report the ranks' balance."""
    from perf_report import step_cost_fit
    lengths0 = [300, 700, 400, 600, 350, 500, 450, 650, 380, 720, 420, 560]
    lengths1 = [320, 680, 420, 560, 400, 500, 430, 700, 360, 700, 450, 600]
    intervals = [None] + [0.1 + 16 * max(a, b) * 2e-5 for a, b in zip(lengths0[1:], lengths1[1:])]
    intervals[8] += 2.0  # a recompile
    entry = {"result": {"warmup_steps": 2, "interval_times_s": intervals,
                        "batch_shapes": [[16, n] for n in lengths0]},
             "other_ranks": [{"batch_shapes": [[16, n] for n in lengths1]}]}
    fit = step_cost_fit(entry)
    assert abs(fit["fixed_ms"] - 100) < 0.1 and abs(fit["ms_per_1k_tokens"] - 20) < 0.01
    assert fit["left_out"] == 1 and fit["steps"] == 9
    expected = sum((a + b) / 2 / max(a, b) for a, b in zip(lengths0[2:], lengths1[2:])) / 10
    assert abs(fit["rank_token_balance"] - round(expected, 3)) < 1e-9
    assert step_cost_fit({"result": {"interval_times_s": [None, 0.3]}}) is None


def test_training_timer_window_ends_with_the_last_step_not_the_closing_save(tmp_path):
    """The GPU-busy window is matched against nvidia-smi samples by wall-clock time: it must cover the timed
    steps, not the idle seconds of the Trainer's closing checkpoint after them."""
    import time
    from types import SimpleNamespace

    from gpu_train_speed import make_timer
    timer = make_timer(tmp_path / "r.json", {}, warmup=2)
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1)
    state, control = SimpleNamespace(global_step=0), None
    timer.on_train_begin(args, state, control)
    for step in range(1, 6):
        timer.on_step_begin(args, state, control)
        time.sleep(0.05)
        state.global_step = step
        timer.on_step_end(args, state, control)
    last_step_end = time.time()
    time.sleep(0.6)  # the closing save
    timer.on_train_end(args, state, control)
    r = json.loads((tmp_path / "r.json").read_text())
    assert abs(r["steady_end_epoch"] - last_step_end) < 0.1
    assert abs((r["steady_end_epoch"] - r["steady_start_epoch"]) - 3 * 0.05) < 0.05  # steps 3-5
    assert r["timed_steps"] == 3 and r["train_finished"]


def test_busy_window_moved_back_off_an_idle_tail():
    from rewindow_busy import rewindow
    points = [(t / 5, 90 if t < 40 else 0) for t in range(60)]  # 8 s at 90% busy, then an idle save
    start, end = 2.0, 9.0  # a 7 s window recorded 1 s late
    moved = rewindow(points, start, end)
    assert moved["shift_s"] == 1.2 and moved["util_tail"] == [0] * 6  # 8.0 to 9.0 s
    assert moved["mean_util_pct"] == 90.0
    assert rewindow(points, 9.0, 11.0) is None  # nothing busy to anchor on


def test_repeated_length_intervals_keep_a_lengths_third_step_on():
    """gpu_train_speed.repeated_length_intervals: under --cuda-graphs a padded length's first two steps warm up and
    record; only later steps of that length (after the warm-up steps, with an interval) are kept."""
    from gpu_train_speed import repeated_length_intervals
    lengths = [384, 384, 416, 384, 416, 416, 384, 448, 416]
    intervals = [None, 0.9, 0.8, 0.30, 0.7, 0.31, 0.29, 0.6, None]
    shapes = [[16, n] for n in lengths]
    assert repeated_length_intervals(shapes, intervals, warmup=0, done=9) == [0.30, 0.31, 0.29]
    assert repeated_length_intervals(shapes, intervals, warmup=4, done=9) == [0.31, 0.29]
    assert repeated_length_intervals(shapes, intervals, warmup=0, done=5) == [0.30]


def test_step_busy_chains_the_intervals_from_the_steady_start():
    """gpu_bench.step_busy: each timed step's utilization comes from the samples between the previous step's end and
    its own, the ends chained from steady_start_epoch; a missing interval (an evaluation) gives no figures."""
    from gpu_bench import step_busy
    points = [(100.1, 90.0), (100.3, 70.0), (100.6, 10.0), (101.4, 50.0)]
    result = {"warmup_steps": 2, "interval_times_s": [None, 0.5, 0.4, 0.4, 0.2, 0.6], "steady_start_epoch": 100.0}
    assert step_busy(points, result) == [80.0, 10.0, None, 50.0]  # 100-100.4, -100.8, -101.0, -101.6
    assert step_busy(points, {**result, "interval_times_s": [None, 0.5, 0.4, None, 0.2, 0.6]}) == []


STACKS_PROGRAM = """
import _thread, sys, threading, time, weakref
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from stack_samples import Sampler

def spin_in_python(seconds):
    end = time.time() + seconds
    while time.time() < end:
        pass

def wait_in_c(seconds):
    time.sleep(seconds)

def hold_the_gil(n):
    sum(range(n))  # one C call that keeps the GIL throughout
    spin_in_python(0.1)

def helper_work(done):
    spin_in_python(0.4)
    done.release()

def wait_for_a_helper(_):
    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(helper_work, (done,))  # a thread threading does not know, as C++ starts them
    done.acquire()

class Held:
    pass

def hold_and_return():
    held = Held()
    time.sleep(0.03)  # a sample falls inside, and sees this frame
    return weakref.ref(held)

def locals_outliving_their_frame(_):
    return sum(hold_and_return()() is not None for _ in range(20))

threading.Thread(target=spin_in_python, args=(5,), daemon=True).start()  # another busy thread, never sampled
sampler = Sampler(Path(sys.argv[2]), 0.02)
steps = [(spin_in_python, 0.4), (wait_in_c, 0.6), (hold_the_gil, 30_000_000), (spin_in_python, 0.2),
         (wait_for_a_helper, None)]
for step, (work, arg) in enumerate(steps):
    sampler.step(step)
    t0 = time.perf_counter()
    work(arg)
    print(step, time.perf_counter() - t0)
sampler.step(len(steps))
print("outliving", locals_outliving_their_frame(None))
sampler.stop()
"""


def test_stack_samples_charge_each_steps_time_to_the_main_threads_frames(tmp_path):
    import subprocess
    from stack_samples import parse, profile, record_and_replay_steps, summarize
    program, stacks = tmp_path / "prog.py", tmp_path / "stacks.txt"
    program.write_text(STACKS_PROGRAM)
    ran = subprocess.run([sys.executable, str(program), str(ROOT / "bench"), str(stacks)], check=True, timeout=60,
                         capture_output=True, text=True).stdout.split()
    # a function's locals die when it returns, although the sampler saw its frame (cudagraph trees need that)
    assert ran[-2:] == ["outliving", "0"]
    wall = {int(k): float(v) for k, v in zip(ran[:-2:2], ran[1:-2:2])}
    every, per_step = parse(stacks)
    assert every == 0.02 and sorted(per_step)[:5] == [0, 1, 2, 3, 4]
    got = {k: profile(per_step[k], 5) for k in per_step}
    for k, seconds in wall.items():  # the samples' seconds add up to each step's time, a sample interval or two off
        assert abs(got[k]["seconds"] - seconds) < 0.1 + 0.2 * seconds, (k, got[k]["seconds"], seconds)
    assert got[0]["self"][0][0] == "prog.py:spin_in_python" and got[0]["self"][0][1] > 0.3
    assert got[1]["self"][0][0] == "prog.py:wait_in_c" and got[1]["self"][0][1] > 0.45
    # the sum() call holds the GIL: the sampler waits, and charges the wait to the stack it sees next, here
    # spin_in_python's inside the function that made the call
    assert dict(got[2]["incl"])["prog.py:hold_the_gil"] > 0.8 * wall[2] and wall[2] > 0.2
    assert ("prog.py:<module>", got[1]["seconds"]) in got[1]["incl"]
    # the main thread waits while a thread started outside threading works: its frames are charged, on top
    assert got[4]["self"][0][0] == "prog.py:spin_in_python" and dict(got[4]["incl"])["prog.py:helper_work"] > 0.3
    assert dict(got[4]["incl"])["prog.py:wait_for_a_helper"] > 0.3
    # lengths 64, 96, 64, 64, 96: the second of each records graphs, the later ones replay
    shapes = {"batch_shapes": [[4, 64], [4, 96], [4, 64], [4, 64], [4, 96]]}
    assert record_and_replay_steps(shapes) == ([2, 4], [3])
    summary = summarize(stacks, {"batch_shapes": [[4, 64], [4, 96], [4, 64], [4, 96]]})
    assert summary["record"]["steps"] == [2, 3] and summary["replay"]["samples"] == 0
    assert summary["record"]["samples"] == len(per_step[2]) + len(per_step[3])


def test_two_gpu_inference_speed_is_compared_at_equal_lengths():
    """perf_report.keep_equal_length_shares: a rank whose batches cost 10% more than one GPU's at the same lengths
    runs at 1/1.1 of its speed, whatever lengths its timed batches have; the timed mean lengths leave the first
    batch out."""
    from perf_report import keep_equal_length_shares

    def log(lengths, slower=1.0):
        return [{"prompt_len": 100, "generate_s": 9.0}] + [{"prompt_len": n, "generate_s": slower * (0.2 + 0.001 * n)}
                                                         for n in lengths]
    run = {"infer_fast": {"result": {"batch_log": log([300, 400, 500, 600, 900])}},
           "infer_fast_2gpu": {"result": {"batch_log": log([700, 800])}, "other_ranks": [
               {"batch_log": log([350, 1200], slower=1.1)}]}}
    keep_equal_length_shares(run)
    two = run["infer_fast_2gpu"]
    assert two["equal_length_shares"] == [1.0, round(1 / 1.1, 4)]
    assert two["timed_prompt_len"] == [540, 750, 775]
