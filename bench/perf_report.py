"""The performance section of bench/RESULTS.md and its headline rows, from gpu_bench.py runs kept in bench/gpu_runs/.

    python bench/perf_report.py --add h100-c:4d2b9e7:OUT/results.json   # keep a run (figures only, no per-row text)
    python bench/perf_report.py --write                                   # render RESULTS.md from bench/gpu_runs/

A run is one device call: every ratio below compares phases of the same run (same machine, same data).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_results import RESULTS, arg_value, update_section  # noqa: E402
from gpu_prefill_floor import table_row  # noqa: E402
from gpu_train_speed import repeated_length_steps  # noqa: E402

RUNS = Path(__file__).resolve().parent / "gpu_runs"
HEAVY = ("predictions", "texts", "batch_log", "losses", "evals", "log_history")  # argv stays


def add(spec: str) -> None:
    label, commit, path = spec.split(":", 2)
    r = json.loads(Path(path).read_text())
    keep_equal_length_shares(r)
    for v in r.values():
        if isinstance(v, dict):
            v.pop("log_tail", None)
            for x in [v.get("result"), *v.get("other_ranks", [])]:
                for key in HEAVY:
                    if isinstance(x, dict):
                        x.pop(key, None)
    r["label"], r["commit"] = label, commit
    RUNS.mkdir(exist_ok=True)
    (RUNS / f"{label}.json").write_text(json.dumps(r, indent=1, default=str) + "\n")


def keep_equal_length_shares(r: dict) -> None:
    """Before the batch logs are dropped: for infer_fast_2gpu beside infer_fast, each rank's speed at equal lengths
    (equal_length_speed) and the mean prompt length of each side's timed batches (all but the first)."""
    one, two = res(r, "infer_fast"), r.get("infer_fast_2gpu") or {}
    ranks = [x for x in [two.get("result"), *two.get("other_ranks", [])] if x and x.get("batch_log")]
    if not one.get("batch_log") or not ranks:
        return
    timed = [one["batch_log"][1:], *(x["batch_log"][1:] for x in ranks)]
    two["equal_length_shares"] = [round(float(equal_length_speed(timed[0], t)), 4) for t in timed[1:]]
    two["timed_prompt_len"] = [round(statistics.mean(b["prompt_len"] for b in t)) for t in timed]


def load() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))}


def res(run: dict, phase: str) -> dict:
    return ((run.get(phase) or {}).get("result")) or {}


def card(run: dict) -> str:
    names = run["env"]["device_info"].splitlines()
    name = names[0].split(",")[0]
    return f"{len(names)}x {name}" if len(names) > 1 else name


def busy(run: dict, phase: str) -> str:
    b = (run.get(phase) or {}).get("gpu_busy") or {}
    return " / ".join(f"{v['mean_util_pct']}%" for v in b.values() if v.get("mean_util_pct")) or "-"


def busy_moved(run: dict, phase: str) -> str:
    """GPU busy over the window moved back onto the steps (bench/rewindow_busy.py), where estimated."""
    b = (run.get(phase) or {}).get("gpu_busy_rewindowed") or {}
    return " / ".join(f"{v['mean_util_pct']}%" for v in b.values() if v) or ""


def step_cost_fit(entry: dict) -> dict | None:
    """A training phase's step-to-step interval fitted as fixed + per-token cost (least squares over the timed
    steps; a step over twice the median, a recompile, is left out). A step's tokens = rows x the longest padded
    length among the ranks at that step, since every rank waits for the slowest at the gradient all-reduce.
    rank_token_balance = mean over steps of (the ranks' mean tokens / their max)."""
    ranks = [x for x in [entry.get("result"), *entry.get("other_ranks", [])] if x and x.get("batch_shapes")]
    if not ranks:
        return None
    warm, intervals = ranks[0].get("warmup_steps", 5), ranks[0].get("interval_times_s") or []
    steps = min(len(intervals), *(len(r["batch_shapes"]) for r in ranks))
    per_rank = [[r["batch_shapes"][k][0] * r["batch_shapes"][k][1] for r in ranks] for k in range(steps)]
    points = [(max(per_rank[k]), intervals[k]) for k in range(warm, steps) if intervals[k] is not None]
    if len(points) < 3:
        return None
    median = statistics.median(y for _, y in points)
    kept = [(x, y) for x, y in points if y <= 2 * median]
    mx, my = statistics.fmean(x for x, _ in kept), statistics.fmean(y for _, y in kept)
    slope = sum((x - mx) * (y - my) for x, y in kept) / sum((x - mx) ** 2 for x, _ in kept)
    return {"fixed_ms": round(1e3 * (my - slope * mx), 1), "ms_per_1k_tokens": round(1e6 * slope, 2),
            "mean_tokens": round(mx), "steps": len(kept), "left_out": len(points) - len(kept),
            "rank_token_balance": round(statistics.fmean(sum(t) / len(t) / max(t) for t in per_rank[warm:steps]), 3)}


def train_rows(label: str, run: dict) -> list[str]:
    out = []
    for phase in ("train_hf", "train_fast", "train_fast_big", "train_fast_autogc", "train_fast_causal",
                  "train_fast_masked", "train_fast_unpadded", "train_fast_cpp", "train_fast_floats",
                  "train_fast_dynamic_floats", "train_fast_graphs",
                  "train_unsloth", "train_unsloth16", "train_fast_2gpu", "train_fast_2gpu_stock", "train_fast_2gpu_bucket", "train_fast_2gpu_split",
                  *(k for k in run if k.startswith("train_") and k.endswith("_again"))):
        x = res(run, phase)
        if not x.get("samples_per_s"):
            continue
        wait = (1 - x["samples_per_s"] / x["samples_per_s_compute"]) * 100 if x.get("samples_per_s_compute") else None
        backend = x.get("backend") or x.get("backend_requested")  # unset when the phase was cut after training
        out.append(f"| {label} | {phase} | {backend} | {x.get('samples_per_step')} | **{x['samples_per_s']}** | "
                   f"{x.get('median_interval_s')} | {x.get('train_peak_gib')} | {busy(run, phase)}"
                   f"{f' [{busy_moved(run, phase)}]' if busy_moved(run, phase) else ''} | "
                   f"{'-' if wait is None else f'{wait:.1f}%'} | {x.get('loss_first', 0):.2f} -> {x.get('loss_last', 0):.2f} |")
    return out


def infer_rows(label: str, run: dict) -> list[str]:
    out = []
    for phase in ("infer_plain", "infer_fast", "infer_fast_generate", "infer_fast_mlp", "infer_fast_unpadded",
                  "infer_fast_big", "infer_fast_2gpu"):
        e = run.get(phase) or {}
        ranks = [x for x in [e.get("result"), *e.get("other_ranks", [])] if x]
        if not ranks:
            continue
        gen = sum(x.get("generate_samples_per_s") or 0 for x in ranks)
        out.append(f"| {label} | {phase} | {len(ranks)} | {arg_value(ranks[0].get('argv') or [], '--batch-size', '64')} | **{e.get('samples_per_s_all_ranks') or ranks[0].get('samples_per_s')}** | "
                   f"{round(gen, 2)} | {ranks[0].get('median_generate_s')} | {ranks[0].get('prompt_tokens_mean')} | "
                   f"{sum(x.get('samples') or 0 for x in ranks)} | {ranks[0].get('peak_gib')} | {busy(run, phase)} |")
    return out


def render(runs: dict[str, dict]) -> str:
    L = ["## Performance on the GPU: baseline and ours in the same call (`bench/gpu_bench.py`)", "",
         "Qwen2.5-VL-3B's architecture with random weights (speed does not depend on them), LoRA r16 on the language "
         "model's 7 projections, bf16, 448 px images (256 image tokens). Training and inference read the pipeline's own "
         "shards of real catalog text (`bench/gpu_make_data.py`: real lengths, train cut at 768 tokens), so a run is "
         "`6_train.py` / `7_infer.py` as a user runs them. Runs (one device call each, code at the commit named):", ""]
    for label, r in runs.items():
        L.append(f"- **{label}**: {card(r)}, {r['env']['started']}, commit `{r['commit']}`, phases "
                 f"{', '.join(k for k in r['env']['phases'])}.")
    L += ["", "- baseline `train_hf`: `6_train.py --backend hf --no-load-in-4bit --batch-size 4 --vision-attention sdpa "
          "--loss-positions all --no-group-by-length --compile none` (transformers + peft as the libraries give them; "
          "batch 16 does not fit with logits at every position).",
          "- ours `train_fast`: `6_train.py --backend hf --no-load-in-4bit --batch-size 16 --group-by-length` (bucketed "
          "vision attention, answer-only logits, uint8 pixels normalized on the GPU, no KV cache in training, and from "
          "commit 469df67 `--compile auto` = every vision block and decoder layer compiled; length grouping was a "
          "default in these runs and is now an option, as it cost the demo some SMAPE; from commit 46dffbb attention "
          "without cuDNN and without the per-step host syncs; from commit b96527e without a padding mask). "
          "`train_fast_causal` (h100-zh, before that commit): `train_fast` with `--no-padding-mask`; "
          "`train_fast_masked`: `train_fast` with `--padding-mask`.",
          "- `train_unsloth`: the default GPU backend (Unsloth, 4-bit base); `train_unsloth16`: Unsloth, bf16 base.",
          "", "### Training", "",
          "| run | phase | backend | samples/step | samples/s | median step s | peak GiB | GPU busy (nvidia-smi) | "
          "data wait | loss first -> last |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, r in runs.items():
        L += train_rows(label, r)
    L += ["", "samples/s = samples per optimizer step / median step-to-step interval (after 5 warm-up steps; the first "
          "steps compile). Data wait = 1 - interval-based / compute-only rate. GPU busy = mean of nvidia-smi's "
          "utilization.gpu, sampled every 200 ms over the timed steps; before commit 2f1d6b6 that window ended "
          "after the Trainer's closing checkpoint instead of at the last step, so it took in up to ~1.5 s of idle "
          "GPU and the figure is low; [in brackets]: the same window moved back to the last busy sample "
          "(`bench/rewindow_busy.py`, an estimate, for the runs whose samples were kept). From run h100-g on, SDPA no longer uses cuDNN "
          "(see the profile below) and the baseline keeps it (`--cudnn-attention`), as the libraries do by default: its "
          "steps that meet a new length take 2.5 s instead of 0.5 s (median unaffected, mean worse).", ""]
    order = phase_order_ms(runs)
    if order:
        L += [f"Phase order: the same A/B (vision MLP padded or not) run in both orders (h100-zk, h100-zl) puts the "
              f"call's second training phase {order[0]:+.1f} ms a step (paired medians) against its first, "
              f"whichever it is; the first phase's loader also waited ~1 ms a step (handover) where the second's did "
              f"not. An A/B run in one order carries that bias; the levers' rows below say where it matters."
              f"{machine_first_sentence(runs)}", ""]
    L += profile_section(runs)
    v = next((res(r, "vision") for r in runs.values() if res(r, "vision").get("tower_s_compiled")), {})
    if v:
        L += ["### Where a prefill's time goes (`bench/gpu_vision_speed.py`, fixed shape 608 tokens, batch 64)", "",
              "| vision attention | tower ms / image | prefill samples/s | tower share of prefill |", "|---|---:|---:|---:|"]
        for tag, name in (("sdpa", "library sdpa, one call per window"), ("bucketed", "bucketed (`common/vision_attention.py`)"),
                          ("compiled", "bucketed + compiled vision blocks")):
            L.append(f"| {name} | {v[f'tower_ms_per_image_{tag}']} | {v[f'prefill_samples_per_s_{tag}']} | "
                     f"{v[f'tower_share_of_prefill_{tag}']} |")
        L += ["", f"Device {v['device']}. Bucketed against sdpa: tower output max difference {v['tower_max_abs_diff']} (the "
              f"same numbers), greedy 8-token generations equal on {v['generate_rows_equal']}/{v['generate_rows']} rows "
              "(the random-weight model has near-ties; a second eager pass can flip them). Compiled against eager: max "
              f"difference {v['compiled_tower_max_abs_diff']} in bf16 (fused kernels round differently), generations "
              f"equal on {v['compiled_generate_rows_equal_bucketed']}/{v['generate_rows']}. On the CPU in fp32 the "
              "bucketed tower equals the per-window one exactly and the compiled blocks give the same loss "
              "(tests/test_speed_paths.py).", ""]
        lm_only = v["images"] / (v["prefill_s_compiled"] - v["tower_s_compiled"])
        L += floor_section(runs)
        L += ["### Levers: predicted, measured, kept", "",
              "| lever | predicted | measured (same run unless said) | kept |", "|---|---|---|---|",
              f"| vision windows as one SDPA call per window length | ~3x on the tower (1,024 tiny calls per image) | "
              f"tower {v['tower_speedup']}x, prefill {v['prefill_samples_per_s_sdpa']} -> "
              f"{v['prefill_samples_per_s_bucketed']} samples/s | yes, default |",
              "| logits and loss at the answer positions only | memory: ~1 GiB per sample less, so batch 16 fits | "
              "batch 16 trains at 52-70 GiB; loss and adapter equal to the full-logits path (CPU test) | yes, default |",
              "| uint8 pixels through the loader, normalized on the GPU | 8x fewer bytes per batch | data wait under 2% "
              "of the step | yes, default |",
              "| length-grouped batches (train), length-sorted (infer) | less padding on real lengths | padded prompt "
              "length 1,114 (plain, file order) -> 635 tokens (7_infer); not isolated in training | yes, default |",
              f"| torch.compile per block (fused norms, rotary, SwiGLU, LoRA adds) | ~1.3x | vision tower "
              f"{v['tower_ms_per_image_bucketed']} -> {v['tower_ms_per_image_compiled']} ms/image; training 20.99 "
              "(h100-a, no compile, KV cache still built) -> 35.09 samples/s (h100-c), two runs | yes, default on GPU |",
              "| Unsloth (its compiled decoder layers, fused LoRA) instead of transformers+peft | faster | 4-bit 27.45 "
              "(h100-a), bf16 29.05 against ours 35.09 (h100-c, same run) | default backend stays Unsloth 4-bit (the "
              "design card); `--backend hf --no-load-in-4bit` is the fastest |",
              "| SDPA without cuDNN (`--no-cudnn-attention`, default) | the profile: cuDNN plan builds were 70% of two "
              "training steps and 47% of an inference batch | training 35.09 (h100-c) -> 45.52 samples/s (h100-g), "
              "GPU busy 59% -> 81.5%; decode step 100 -> 36 ms, inference 38.17 (h100-e) -> 45.17 (h100-g) | yes, "
              "default |",
              "| no per-step host syncs: the Trainer's isnan check, parameter walk for its FLOP count, the number "
              "constraint's per-row loop (1,280 syncs a batch), rotary position ids on the host | a few % of a step; "
              "~100 ms of each inference batch | syncs per inference batch 1,914 -> 50; inference 45.17 -> 52.38 "
              "(h100-h, with the host position ids) | yes, default |",
              "| larger inference batch (256) | decode steps cost about the same at any batch | 45.72 against 52.38 at "
              "64 (h100-h): the long-tail batch pads 256 rows to 1,749 tokens; per sample at equal length 15% faster | "
              "no: batch 64 stays (token-budget batching would keep the gain) |",
              "| vision features precomputed in stage 4 | after compile the tower is ~3.3 ms/image, 53 ms of a 350 ms "
              "batch-16 step: at most ~15% | not built: training is past its goal without it | no |",
              "| static-cache decode, each step one CUDA-graph replay (`--decode graphs`, `common/decode.py`) | decode "
              "is 9 host-bound steps of 36 ms per batch of 64 (h100-h), 330 of 1,080 ms: to ~5 ms a step | decode step "
              "36 -> 27 ms (h100-k): the replayed kernels were half a copy of the key/value heads | yes, default on a GPU "
              "with the hf backend |",
              "| grouped-query decode attention (16 query heads folded onto their 2 key/value heads in one SDPA call "
              "instead of copying the heads 8x) | the copy was 10.6 of 21.8 ms of GPU time per step (h100-k trace) | "
              "decode step 27 -> 9.2 ms; 7_infer 62.79 samples/s against 47.76 with generate (h100-l), predictions "
              "equal on 1,280/1,280 rows | yes, with the static decoder |",
              "| prefill right-aligned, so causal attention needs no mask (flash kernel, grouped heads, no copies) | "
              "the masked prefill copied heads too (~58 ms of 743) | prefill 743 (h100-l) -> 696 ms (h100-n) | yes, "
              "default (bf16 rounding then differs from the masked kernel: 1,071/1,280 random-weight predictions "
              "equal, h100-p; in fp32 on the CPU the tokens are identical) |",
              "| next batch collated, given its position ids and pinned in a thread; decode steps queued before the "
              "done check | host preparation ~100 ms a batch with the GPU idle (h100-n), ~3.6 ms idle per graph "
              "launch | 7_infer 67.76 samples/s against 46.95 with generate and 17.41 for the plain loop (h100-p) "
              "| yes, default |",
              "| the language model's MLPs and norms compiled (`--compile vision+mlp`) | fused SwiGLU and RMSNorm: "
              "~10% of the prefill | 62.79 -> 68.66 samples/s (h100-l); 1,064/1,280 predictions equal | no: opt-in, "
              "bf16 rounding moves 17% of the random-weight predictions |",
              "| rotary position ids and the vision tower's indices built by the collator on the host "
              "(`common/positions.py`), and a thread preparing batches two ahead, stream pulls included | the h100-p "
              "profile: a 48 ms gap per batch charged to the model's `get_rope_index` (the preparing thread held the "
              "interpreter lock), 15 ms in the tower's index building | 7_infer 67.76 (h100-p) -> 73.07 samples/s "
              "(h100-q), with generate 46.95 -> 56.30; GPU busy (nvidia-smi) 87.6% -> 95.5%; training: host syncs "
              "per 2 steps 174 (h100-j) -> 20 (h100-r), busy 83.5% -> 86.8% by the profiler, 81.5% -> 84.5% by "
              "nvidia-smi; ids equal to the model's own (CPU tests) | yes, default (hf backend) |",
              "| one KV arena shared by every decode step's static cache, 32 graphs kept | re-captures of evicted "
              "graphs: 9 in 20 batches (h100-p), each a warm-up, a capture and a 2 GB allocation | 10 captures in 20 "
              "batches (h100-q): in a 20-batch run the arena still grows, and each growth drops the graphs; what it "
              "stops is the re-capture in every later window of a long run (not measured: needs thousands of rows) "
              "| yes, default |",
              "| shards dealt to ranks first, then to each rank's workers | dealt by (rank, worker) slot, rank 0 of 2 "
              "got 12 batches and rank 1 got 8 (h200x2-m) | 10 and 10 (h200x2-t) | yes |",
              "| the Trainer's batch copy to the GPU without waiting (pinned batches); the pixel mean and std sent "
              "to the GPU once | 11 and 2 of the 20 host syncs per 2 steps (h100-r) | not measured on the GPU "
              "(device time ran out) | yes |",
              "| the Trainer's per-step `model.train()` walk over ~3,400 modules skipped when every module is "
              "already training (`common.model.training.skip_needless_train_walks`) | the h100-s profile: ~18 ms of host "
              "time a step with the GPU idle, ~5% | nvidia-smi busy 81.7% (h100-s) -> 86.6% (h100-x), 47.15 -> "
              "48.16 samples/s; two runs on the same bench (batches and recompiles differ between runs) | yes |",
              "| each compiled block one graph under DDP (`torch._dynamo.config.optimize_ddp` off; "
              "`--ddp-split-graphs` restores PyTorch's default) | the default cut every decoder layer in two at "
              "DDP's 1 MB first bucket: lost fusions and 9 GiB more activations, for an overlap per-layer regions "
              "already give | 2 H200s (h200x2-y, same run, same batches): 87.56 -> 92.12 samples/s, 1.70x -> "
              "1.79x one GPU; 18 ms a step (median); peak 61.12 -> 52.1 GiB | yes, default |",
              "| no read-backs in a training forward: answer positions from the loader's labels, the 4-D mask "
              "built by the collator, image tokens checked on the host | 6 host syncs per step (h100-s profile) | "
              "h100-x -> h100-z over the same batches: 48.16 -> 51.33 samples/s and 86.6% -> 88.5% busy, but per "
              "step within the noise (median +3 ms, mean -5 ms); same first loss | yes (same loss and gradients; "
              "fewer syncs for a deeper queue) |",
              "| DDP without the per-forward buffer broadcast, gradients kept in its buckets (`--no-ddp-broadcast-"
              "buffers`, `--ddp-grads-in-buckets`, defaults) | the broadcast syncs the ranks before each forward for "
              "constant rotary buffers; the copies are ~1,000 small kernels a step | 2 H200s (h200x2-z, same "
              "batches): 84.48 -> 90.07 samples/s, 1.78x -> 1.89x one GPU; 29 ms a step (median, 31 of 34 steps "
              "faster); same losses; 1.82x in a second call (h200x2-za) | yes, default |",
              "| one all-reduce after the backward (`--ddp-bucket-mb 256`) | NCCL kernels no longer beside the "
              "backward | 92.8 -> 92.64 samples/s, -2 ms a step (median, 21 of 35 faster; h200x2-za): noise | no: "
              "option |",
              "| batch 20 instead of 16 on the H100 | longer kernels, fewer launch gaps | 44.82 -> 46.36 samples/s "
              "(+3.4%), 63.09 GiB peak (h100-za; that H100 ran batch 16 13% slower than h100-z's); h100-zc: 47.56 "
              "-> 51.29 by the median step (+7.8%), 46.78 -> 48.46 over the window (+3.6%), busy 92.6% -> 93.4% | "
              "no: option (63 GiB peak, 75 GiB reserved of the card's 80) |",
              "| Python's automatic garbage collector off while training, collected every 50 steps on every rank "
              "(`--gc-every`) | ~1 s stalls at steps that differ between runs of the same batches | h100-zc, same "
              "batches: no stall with either collector in 30 steps; automatic minus scheduled -2 ms a step "
              "(median), 47.79 against 46.78 samples/s over the window: no gain shown; full collections of the 3B "
              "0.3-1.0 s (h100-zb, h100-zc) | yes, default (torchtitan's practice; costs nothing clearly measurable) |",
              "| 2 GPUs at 4 micro-batches per optimizer step (`6_train.py`'s default; DDP syncs once per step) | "
              "the 20-30 ms two ranks add per all-reduce spread over four micro-batches: ~1.95x | 2 H200s "
              "(h200x2-zb, same call): 48.51 -> 97.62 samples/s, 2.01x; step by step -7 ms (median) against one GPU "
              "| default since the first release; the 2-GPU headline is now measured at it |",
              padding_mask_row(runs), *filter(None, [vision_mlp_row(runs)]),
              cpp_wrapper_row(runs), graphs_row(runs),
              floats_row(runs), infer_floats_row(runs), vision_indices_row(runs), lora_groups_row(runs),
              needs_row(runs, lm_only), ""]
    L += ["### Inference", "",
          "| run | phase | GPUs | batch | samples/s end to end | generate-only samples/s | median batch s | prompt tokens "
          "(mean) | rows | peak GiB | GPU busy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in runs.items():
        L += infer_rows(label, r)
    L += ["", "Baseline `infer_plain`: AutoProcessor + `Qwen2_5_VLForConditionalGeneration` (bf16, sdpa) + "
          "`model.generate(max_new_tokens=10)` over the rows in file order, batch 64. Ours `infer_fast`: `7_infer.py "
          "--batch-size 64` (shards, length-sorted batches, bucketed + compiled vision, number-constrained greedy "
          "decoding; from commit 6430693 over a static cache with CUDA-graph decode steps, from 76ad8f3 a right-aligned "
          "prefill and the next batch prepared in a thread). `infer_fast_generate`: the same with `--decode generate` "
          "(the library's loop); `infer_fast_mlp`: with `--compile vision+mlp`. Random weights and no adapter here, so the plain loop rarely emits a number and the texts cannot be "
          "compared row by row; the CPU tests show the same logits for the same inputs. 2 GPUs: `torchrun "
          "--nproc_per_node 2 7_infer.py`. Until h200x2-t a rank's rate ran to the end of `main()`, so rank 0's "
          "included waiting at the closing barrier for rank 1, whose first batch compiled longer (38.34 against "
          "71.22 generate-only, h200x2-t); from h200x2-u it ends at the rank's last batch, and the whole job's "
          "time is `total_s`. Between 1 and 2 GPUs the batches differ (each rank sorts its own share), and bf16 "
          "near-ties then give 1,240/1,280 equal random-weight predictions (h200x2-u; 1,088 in h200x2-m).", "",
          "Before these levers (commit ed482a8, H200, an adapter trained 25 steps, in git history): the plain loop and "
          "`7_infer.py --no-constrained` gave the same price on 475 of 512 rows; the rest diverged where batch "
          "composition moved near-tied bf16 logits.", ""]
    return "\n".join(L)


def profile_section(runs: dict[str, dict]) -> list[str]:
    """Busy share, syncs and prefill/decode split from the profiled phases (bench/gpu_profile.py)."""
    L = ["### Where the GPU waited (`bench/gpu_profile.py`, torch.profiler)", "",
         "| run | commit | profiled | GPU busy (kernel time / wall) | host syncs per unit | prefill ms | decode step ms "
         "| largest idle charge |", "|---|---|---|---:|---:|---:|---:|---|"]
    for label, r in runs.items():
        for phase, unit in (("profile_train", "2 training steps (batch 16)"), ("profile_infer", "2 batches of 64"),
                            ("profile_train_2gpu", "2 training steps (batch 16), rank {} of 2")):
            e = r.get(phase) or {}
            for rank, x in enumerate([e.get("result") or {}, *e.get("other_ranks", [])]):
                plain = x.get("plain") or e.get("trace_analysis") or {}
                if not plain.get("gpu_busy_pct"):
                    continue
                top = (plain.get("idle_charged_ms") or [{}])[0]
                L.append(f"| {label} | `{r['commit']}` | {unit.format(rank)} | {plain['gpu_busy_pct']}% of "
                         f"{plain['wall_ms']:.0f} ms | {x.get('syncs_in_one_unit', '-')} | "
                         f"{x.get('prefill_ms_median') or '-'} | {x.get('decode_step_ms_median') or '-'} | "
                         f"{top.get('host', '-')[:60]}: {top.get('ms', '-')} ms |")
    L += ["", "Idle gaps are charged to the host operation running at the gap's midpoint (`bench/trace_gaps.py`). Before "
          "(h100-f): cuDNN's attention built a new execution plan for every new sequence length, which with real "
          "lengths is every batch and every decode step: 2.1 s of a 4.6 s pair of inference batches and 2.3 s of a "
          "3.3 s pair of training steps. The generation's rotary position ids ran as a per-row loop of tiny kernels with "
          "syncs (~100 ms per batch), and the number constraint synchronized once per row per step. After (h100-g, "
          "h100-h): an inference batch of 64 is ~50 ms of host preparation (collating, position ids, copies), a prefill "
          "at ~99% busy (706 ms median from the model call's first to its last kernel), and 9 decode steps of ~36 ms at "
          "~40% busy: launch-bound, ~1,800 small kernels each from the eager language model. The GPU-busy goal is met "
          "by the prefill and missed by the decode, which is where a CUDA-graph decode would go. Inside a training "
          "step (h100-j; the window runs from the Trainer's step begin to step end, so the batch handover between "
          "steps is not in it) the GPU is 83.5% busy; what idles is host time before the forward (the Trainer's "
          "per-step `model.train()` over every module, and the model's per-row rotary index loop with 174 syncs per "
          "step). Unsloth 4-bit, rerun in h100-j after these changes: 27.64 samples/s "
          "(27.45 in h100-a), 77% busy: it has its own attention path.", "",
          "Inference after the static-cache decoder (h100-k to h100-p): the graphed decode step first spent half its "
          "GPU time copying the 2 key/value heads to 16 (transformers' sdpa does so whenever there is a mask), fixed by "
          "the grouped decode attention (27 -> 9.2 ms a step). Then the idle time was the host: ~100 ms per batch "
          "computing the rotary position ids and collating while the GPU waited (h100-n, a slower host), and ~3.6 ms "
          "per graph launch because the host waited for the done flag before queueing the next step. Both now overlap "
          "GPU work (h100-p): an inference batch of 64 is a 696 ms prefill plus 9 decode steps of 9.2 ms, 82% busy by "
          "the profiler (87.6% by nvidia-smi); what idles is the prefill's own host work (the vision tower's "
          "data-dependent index building) and the first replays of each new graph.", "",
          "Two GPUs, training (h200x2-m, each rank profiles its own steps): both ranks are ~78% busy. On rank 1 the "
          "largest kernel is NCCL's all-reduce, 195 ms over two steps: time spent waiting for rank 0, whose two batches "
          "were longer (its compute ~620 ms against ~465 ms). Each rank length-groups its own share of the data, so "
          "the ranks' batches at a step differ in length and every step runs at the slower rank's pace; the gradient "
          "all-reduce itself is short (a few ms, overlapped with the backward). The bench also logs every step, which "
          "adds a collective and a host sync per step that a real run (logging every 10+ steps) has rarely. "
          "At that run's size (256 rows, 4 loader workers a rank: windows of 32 samples) the length grouping "
          "balances the ranks' steps to 92% by `bench/rank_balance.py`'s count; see below for larger data.", "",
          "After the host-built ids (h100-q, h100-r): an inference batch is a 686 ms prefill and 9 graphed decode "
          "steps of 8.4 ms, 95.5% busy by nvidia-smi; the profiler's two-batch window (89.5%) holds one decode-graph "
          "capture, the next batch is 97.1% busy. The training step has 20 host syncs per two steps instead of 174; "
          "11 of them were the Trainer's blocking copies of the batch, since made asynchronous. What idles a "
          "training step now is the host at its start: with logging every step (the bench does, to time steps) "
          "the loss is read back each step, so the Trainer's per-step `model.train()` walk and the batch handover "
          "run with the GPU empty.", "",
          "Two GPUs, training at 1,024 rows and 2 loader workers a rank (h200x2-s): the median step is 0.364 s on "
          "one GPU and 0.427 s on each of two (17% longer), and 8% of the 2-GPU interval is spent between steps "
          "(0.8% on one GPU). `bench/rank_balance.py` (CPU; the real catalog's token lengths through the same "
          "length grouping, step cost = padded tokens + a fixed vision share) puts the ranks' per-step balance "
          "at 97.7% for this setup and 97.8% at 75,000 rows: imbalance explains ~2 of those 17 points. The rest "
          "is not located: the likely cost is the per-step synchronization of the bench's per-step logging (a "
          "loss all-gather and a host read-back on both ranks, so each rank's host work between steps runs with "
          "its GPU empty and the slower rank's sets the pace), which a real run logging every 10 steps has 10x "
          "less of. Not profiled on two ranks after the changes (device time ran out). The next paragraphs "
          "measure it with those syncs gone: they were part of it, not all.", ""]
    L += bench_timing_paragraphs(runs)
    return L


def bench_timing_paragraphs(runs: dict[str, dict]) -> list[str]:
    """The runs after the step timer stopped synchronizing (from commit 263c32a), and what their steps cost."""
    fits = {(label, phase): step_cost_fit(runs[label][phase]) for label in ("h100-x", "h200x2-w")
            for phase in ("train_fast", "train_fast_2gpu") if runs.get(label, {}).get(phase)}
    if len(fits) < 3:
        return []
    one, two = fits[("h200x2-w", "train_fast")], fits[("h200x2-w", "train_fast_2gpu")]
    h100 = fits[("h100-x", "train_fast")]
    v1, v2 = res(runs["h200x2-v"], "train_fast"), res(runs["h200x2-v"], "train_fast_2gpu")
    return [
        "The bench's own syncs (from commit 263c32a, runs h100-s on): until then the training timer synchronized "
        "the GPU at every step's begin and end and the bench logged the loss every step, and the training profile "
        "synchronized after each profiled step. Each of these left the GPU idle while the host prepared the next "
        "step, which `6_train.py` alone never does, so training speed and GPU busy were under-stated, and more so "
        "on two ranks. Steps are now marked with CUDA events read when training ends, each step's loss is kept "
        "as a tensor and read once, the loss is logged every 10 steps (the stage's default), and a training "
        "profile is one window over consecutive steps with no sync inside. Rates before and after the change "
        "are not comparable.", "",
        f"Training GPU busy on the H100 after skipping the Trainer's per-step `model.train()` walk (h100-x): "
        f"{busy(runs['h100-x'], 'train_fast')} by nvidia-smi over the timed steps (h100-s, the same bench before "
        f"that change: {busy(runs['h100-s'], 'train_fast')}); on an H200, {busy(runs['h200x2-v'], 'train_fast')} "
        f"(h200x2-v) and {busy(runs['h200x2-w'], 'train_fast')} (h200x2-w, whose timed window holds a 1.46 s step "
        f"that recompiled for a new length). The h100-x profile was cut when the device time ran out.", "",
        f"What a training step costs (`step_cost_fit`: interval = fixed + per-token cost, tokens = rows x the "
        f"longest padded length among the ranks). One H100 (h100-x): {h100['fixed_ms']} ms + "
        f"{h100['ms_per_1k_tokens']} ms per 1,000 tokens (a batch of 16 averages {h100['mean_tokens']:,}). "
        f"h200x2-w, one H200: {one['fixed_ms']} ms + {one['ms_per_1k_tokens']} ms per 1,000; two H200s: "
        f"{two['fixed_ms']} ms + {two['ms_per_1k_tokens']} ms per 1,000, with the ranks' tokens balanced to "
        f"{100 * two['rank_token_balance']:.1f}% per step. So two ranks add a fixed "
        f"~{two['fixed_ms'] - one['fixed_ms']:.0f} ms to every step whatever its length, and imbalance is not "
        f"the cause. NCCL runs over NVLink (`P2P/CUMEM`, NCCL_DEBUG=INFO in h200x2-w), at whose bandwidth "
        f"the 120 MB of fp32 LoRA gradients should take well under a millisecond (timed in h200x2-y: 0.47 ms). "
        f"Not located in that session; the next paragraphs locate most of it: torch.compile cut every compiled "
        f"decoder layer in two under DDP. Scaling with the bench's syncs gone: "
        f"{v1['samples_per_s']} -> {v2['samples_per_s']} samples/s, {v2['samples_per_s'] / v1['samples_per_s']:.2f}x "
        f"(h200x2-v; 1.58x with them, h200x2-s). By the same fit about half of a one-GPU step does not grow with "
        f"its length (an extrapolation: batches run from ~350 to 768 tokens a row). The likely parts are the "
        f"frozen vision tower over 16 images (~53 ms at 3.3 ms an image), the optimizer and launch-bound LoRA "
        f"kernels. A faster single-GPU step lies there.", ""] + step_parts_paragraphs(runs) + ddp_setup_paragraphs(runs) + \
        accumulation_paragraphs(runs)


def seg(result: dict) -> str:
    """A step's parts, 'forward 180.1, backward 140.2, ...' (ms, medians)."""
    return ", ".join(f"{k} {v:g}" for k, v in result["segments_ms"].items())


def ratio(faster: dict, base: dict) -> str:
    return f"{faster['samples_per_s'] / base['samples_per_s']:.2f}x"


def loss_gap(base: dict, variant: dict) -> float:
    """The largest difference between two runs' first, logged and last losses, over the same batches."""
    pairs = [(base["loss_first"], variant["loss_first"]), *zip(base["logged_losses"], variant["logged_losses"]),
             (base["loss_last"], variant["loss_last"])]
    return max(abs(a - b) for a, b in pairs)


def paired_step_ms(base: dict, variant: dict) -> list[float]:
    """variant minus base, ms, step by step over the timed steps of two runs over the same batches; a step over
    twice base's median in either run (a recompile) is left out."""
    cap = 2 * base["median_interval_s"]
    return [1e3 * (b - a) for a, b in zip(base["interval_times_s"][base["warmup_steps"]:],
                                          variant["interval_times_s"][variant["warmup_steps"]:])
            if a and b and max(a, b) < cap]


def step_parts_paragraphs(runs: dict[str, dict]) -> list[str]:
    """Each step cut into its parts (`segments_ms`, from commit 19004e4) and what the 2-GPU cost turned out to be."""
    y, z = runs.get("h200x2-y"), runs.get("h100-z")
    if not y or not z:
        return []
    one, two, cut = (y[p]["result"] for p in ("train_fast", "train_fast_2gpu", "train_fast_2gpu_split"))
    rank1 = y["train_fast_2gpu"]["other_ranks"][0]
    fit1, fit2, fit_cut = (step_cost_fit(y[p]) for p in ("train_fast", "train_fast_2gpu", "train_fast_2gpu_split"))
    paired = paired_step_ms(two, cut)
    h1, hx = res(z, "train_fast"), res(runs["h100-x"], "train_fast")
    h100_paired = paired_step_ms(hx, h1)
    return [
        f"Where a step's time goes (from commit 19004e4 each timed step is cut by CUDA events at its forward's "
        f"end, its backward's end, the clipping's end and the optimizer's end; medians in ms). One H200 "
        f"(h200x2-y): {seg(one)}. Two H200s, rank 0: {seg(two)}; rank 1: {seg(rank1)}. A lone all-reduce of "
        f"the {two['allreduce_ms']['mb']} MB of fp32 LoRA gradients takes {two['allreduce_ms']['median_ms']} ms "
        f"over NVLink. So the step is all forward and backward: the handover between steps and the optimizer "
        f"are ~1 ms, and the GPU's queue never empties between steps.", "",
        f"Why two ranks cost more (h200x2-y, three runs over the same batches): under DDP, torch.compile's "
        f"DDPOptimizer cuts each compiled region at DDP's gradient-bucket edges so that all-reduces can start "
        f"inside it. Our regions are single decoder layers, whose gradients reach DDP as each layer's backward "
        f"ends anyway; a layer's 3.3 MB of fp32 LoRA weights passes DDP's 1 MB first bucket, so every layer "
        f"compiled as two graphs, with the fusions across the cut lost, {cut['train_peak_gib']} GiB peak "
        f"against {two['train_peak_gib']} GiB, and no overlap gained. `6_train.py` now keeps each block one "
        f"graph (`--ddp-split-graphs` restores the cut). Step by step over identical batches the cut costs "
        f"{statistics.median(paired):.0f} ms (median; {sum(d > 0 for d in paired)} of {len(paired)} steps slower): "
        f"{cut['samples_per_s']} samples/s with it ({cut['samples_per_s'] / one['samples_per_s']:.2f}x one GPU), "
        f"{two['samples_per_s']} without ({two['samples_per_s'] / one['samples_per_s']:.2f}x). By the fit, two "
        f"ranks now add {fit2['fixed_ms'] - fit1['fixed_ms']:.0f} ms to a step's fixed cost "
        f"({fit1['fixed_ms']} -> {fit2['fixed_ms']} ms; {fit_cut['fixed_ms']} ms with the cut). What remains, by "
        f"the parts: each rank's backward is {two['segments_ms']['backward'] - one['segments_ms']['backward']:.0f} "
        f"and {rank1['segments_ms']['backward'] - one['segments_ms']['backward']:.0f} ms longer than on one GPU "
        f"(rank 0's includes waiting for rank 1, whose forward ran "
        f"{rank1['segments_ms']['forward'] - two['segments_ms']['forward']:.0f} ms longer: its batches are "
        f"{100 * fit2['rank_token_balance']:.0f}% balanced against rank 0's). The all-reduce itself is under "
        f"half a millisecond, so the rest of the backward's extra time is the reducer's work and the NCCL "
        f"kernels running beside the backward; 1.9x needs a 2-GPU step of "
        f"{1e3 * one['median_interval_s'] * 2 / 1.9:.0f} ms against {1e3 * two['median_interval_s']:.0f}. The "
        f"next paragraphs find most of that extra time in DDP's own setup, and measure the one-bucket lever.", "",
        f"The training forward's read-backs (from commit e3da4db): the h100-s profile found 6 host syncs in "
        f"each training forward: the answer positions (a `nonzero` on the GPU labels, which waits for the "
        f"previous step to finish), transformers' two padding checks before it builds the causal mask, the "
        f"per-image split of the vision output (`.tolist()` of the grids, undone on the next line) and the "
        f"image-token check with its message. Now the positions come from the loader's labels on the host, the "
        f"collator hands a training batch its 4-D causal-and-padding mask (none when nothing is padded) and "
        f"checks each sample's image tokens against its grid, so the forward merges image features without a "
        f"check on the GPU. Same loss and gradients on the CPU; on the H100 the first loss is "
        f"{h1['loss_first']:.4f} as before ({hx['loss_first']:.4f}, h100-x). h100-z: {h1['samples_per_s']} "
        f"samples/s and {busy(z, 'train_fast')} busy, against {hx['samples_per_s']} and "
        f"{busy(runs['h100-x'], 'train_fast')} in h100-x, two runs over the same batches; but step by step "
        f"the change is within the noise (median {statistics.median(h100_paired):+.0f} ms, mean "
        f"{statistics.fmean(h100_paired):+.0f} ms, {sum(d < 0 for d in h100_paired)} of {len(h100_paired)} steps "
        f"faster), so the gain in the rate is not the read-backs' to claim. Its parts: {seg(h1)}. A likely "
        f"reason (not profiled): a read-back drains the queue only for as long as the host takes to launch the "
        f"next kernels, short beside a 170 ms forward. The host syncs left were not counted: h100-y's profile "
        f"ran out of time.", ""]


def long_steps(x: dict) -> list[str]:
    """Steps after the first two (which compile) over twice the median: 'index (padded length): seconds'."""
    cap = 2 * x["median_step_s"]
    return [f"{k} ({x['batch_shapes'][k][1]}): {t:.2f} s{' (warm-up)' if k < x['warmup_steps'] else ''}"
            for k, t in enumerate(x["step_times_s"]) if k >= 2 and t > cap]


def imbalance_ms(run: dict) -> float:
    """What a 2-GPU step pays for its ranks' unequal batches: the slower rank's tokens over the ranks' mean,
    priced at the one-GPU fit's cost per token (timed steps, rank 0 and rank 1)."""
    two = run["train_fast_2gpu"]
    ranks = [two["result"], *two.get("other_ranks", [])]
    warm = ranks[0]["warmup_steps"]
    per_step = list(zip(*[[rows * length for rows, length in r["batch_shapes"]][warm:] for r in ranks]))
    extra = statistics.fmean(max(t) - statistics.fmean(t) for t in per_step)
    return extra * step_cost_fit(run["train_fast"])["ms_per_1k_tokens"] / 1e3


def ddp_setup_paragraphs(runs: dict[str, dict]) -> list[str]:
    """DDP as PyTorch sets it up against ours (from commit cb1545b), the one-bucket lever, a larger batch on the
    H100, and the long steps that cost the GPU-busy figure."""
    z, za, hza = runs.get("h200x2-z"), runs.get("h200x2-za"), runs.get("h100-za")
    if not z or not za or not hza:
        return []
    one_z, stock, lean = (res(z, p) for p in ("train_fast", "train_fast_2gpu_stock", "train_fast_2gpu"))
    stock1, lean1 = (z[p]["other_ranks"][0] for p in ("train_fast_2gpu_stock", "train_fast_2gpu"))
    one_za, two_za, bucket = (res(za, p) for p in ("train_fast", "train_fast_2gpu", "train_fast_2gpu_bucket"))
    d_lean, d_bucket = paired_step_ms(stock, lean), paired_step_ms(two_za, bucket)
    b16, b20 = res(hza, "train_fast"), res(hza, "train_fast_big")
    zb_run = runs.get("h100-zb") or {}
    zb = res(zb_run, "train_fast_autogc")
    if not zb:
        return []
    full_zb = [ms for step, ms in zb["gc_full"]]
    steps_zb = [step for step, ms in zb["gc_full"]]
    young_zb = sum(ms for step, n, ms in zb["gc_young"] if zb["warmup_steps"] <= step < len(zb["step_times_s"]))
    rz = zb_run["train_fast_autogc"]["gpu_busy_rewindowed"]["gpu0"]
    zb_busy = f"{busy(zb_run, 'train_fast_autogc')} busy"
    stalls = {f"{label} {phase}": long_steps(res(runs[label], phase)) for label, phase in
              (("h100-z", "train_fast"), ("h200x2-z", "train_fast"), ("h200x2-za", "train_fast"),
               ("h100-za", "train_fast"))}
    return [
        f"DDP's own setup (from commit cb1545b; h200x2-z, the two variants over the same batches). PyTorch's DDP "
        f"broadcasts rank 0's buffers to every rank before each forward, and copies each gradient into its "
        f"all-reduce bucket and back. Qwen2.5-VL's only buffers are its rotary frequencies, built the same on "
        f"every rank, so the broadcast is a collective a step that syncs the ranks for nothing; the copies are "
        f"two small kernels per LoRA tensor, ~1,000 a step on the 3B. `6_train.py` now turns the broadcast off "
        f"and keeps the gradients in the buckets (`gradient_as_bucket_view`; `--ddp-broadcast-buffers` and "
        f"`--no-ddp-grads-in-buckets` restore PyTorch's setup). Step by step it saves "
        f"{-statistics.median(d_lean):.0f} ms (median; {sum(d < 0 for d in d_lean)} of {len(d_lean)} steps "
        f"faster): {stock['samples_per_s']} -> {lean['samples_per_s']} samples/s, {ratio(stock, one_z)} -> "
        f"{ratio(lean, one_z)} one GPU ({one_z['samples_per_s']}). Rank 1's parts with PyTorch's setup: "
        f"{seg(stock1)}; with ours: {seg(lean1)}. Same losses (first {stock['loss_first']:.4f} both). Every "
        f"rank ends with the same LoRA weights; `stats.json` now says so (`ranks_hold_same_weights`, an "
        f"all-reduce of per-tensor sums at the end), and the CPU torchrun test checks it.", "",
        f"The same code in a second call (h200x2-za, another pair of H200s): {one_za['samples_per_s']} -> "
        f"{two_za['samples_per_s']} samples/s, {ratio(two_za, one_za)}. The one-GPU rate moves between calls "
        f"({one_z['samples_per_s']} and {one_za['samples_per_s']}, 7%), and so does the ratio: 1.9x is met in "
        f"neither call, {ratio(lean, one_z)} being the closer. One all-reduce after the backward "
        f"(`--ddp-bucket-mb 256`, same call, same batches): {bucket['samples_per_s']} samples/s, "
        f"{statistics.median(d_bucket):+.0f} ms a step (median; {sum(d < 0 for d in d_bucket)} of {len(d_bucket)} "
        f"steps faster): within the noise, so DDP's 25 MB buckets stay the default. What two ranks still add "
        f"(h200x2-za, ms): one GPU {seg(one_za)}; two, rank 0: {seg(two_za)}; rank 1: "
        f"{seg(za['train_fast_2gpu']['other_ranks'][0])}. Part of rank 0's longer backward is waiting for "
        f"rank 1's longer forward: each rank groups its own share of the data by length, so the ranks' batches "
        f"differ at a step ({100 * step_cost_fit(za['train_fast_2gpu'])['rank_token_balance']:.1f}% token "
        f"balance). Priced by the one-GPU cost fit ({step_cost_fit(za['train_fast'])['ms_per_1k_tokens']} ms per "
        f"1,000 tokens), the slower rank's extra tokens cost ~{imbalance_ms(za):.0f} ms a step; the rest of the "
        f"{1e3 * (two_za['median_interval_s'] - one_za['median_interval_s']):.0f} ms is DDP's and NCCL's work "
        f"beside the backward. Evening the batches out needs the ranks to plan them together (not built).", "",
        f"A larger batch on the H100 (h100-za, same call): batch 16 {b16['samples_per_s']} samples/s, "
        f"{busy(hza, 'train_fast')} busy; batch 20 {b20['samples_per_s']} samples/s "
        f"({b20['samples_per_s'] / b16['samples_per_s'] - 1:+.1%}), {busy(hza, 'train_fast_big')} busy, "
        f"{b20['train_peak_gib']} GiB peak ({b20['train_peak_reserved_gib']} reserved) of the H100's 80. This "
        f"H100 ran batch 16 slower than h100-z's ({res(runs['h100-z'], 'train_fast')['samples_per_s']}; forward "
        f"{b16['segments_ms']['forward']:g} against {res(runs['h100-z'], 'train_fast')['segments_ms']['forward']:g} "
        f"ms), and its batch-16 window holds a long step (below). Batch 20 stays an option: the gain is small, "
        f"memory is near the card's limit, and it does not lift the GPU-busy figure past h100-z's.", "",
        "Long steps after the first two, which compile (over twice the median; step index (padded length): "
        "seconds; the timed window starts at step 5): "
        + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in stalls.items()) + ". Runs of the same batches "
        f"stall at different steps (the two H100 runs at 4 and 6, the two 2-GPU calls' one-GPU phases at 16 and "
        f"18), so it is not a recompile for a new shape. Each stall leaves the GPU idle for "
        f"about a second, which costs nvidia-smi's busy figure ~10 points over a 25-step window and the median "
        f"rate nothing. A likely cause is Python's automatic full garbage collection, which walks every live "
        f"object (torch.compile's graphs and guards among them): this bench's CPU dry run (the small model, its "
        f"blocks compiled) logs full collections of 240-370 ms in its first steps; the 3B's were not "
        f"measured. From commit cdf844a, "
        f"`6_train.py` turns the automatic collector off while training. It collects the young generations every "
        f"50 steps (`--gc-every`) on every rank at the same step, and everything at evaluations and saves, as "
        f"torchtitan does. The bench now logs every collection with its step (`gc_full`, `gc_young`); the A/B on "
        f"the GPU is in the next paragraphs (h100-zc). One short H100 call "
        f"(h100-zb, {len(zb['step_times_s'])} steps with the automatic collector on) timed the 3B process's full "
        f"collections at {min(full_zb):.0f}-{max(full_zb):.0f} ms: the size of the stalls. Its "
        f"{len(full_zb)} full collections fell at steps {', '.join(str(s) for s in steps_zb)} (0 and 1 compile; "
        f"{len(zb['step_times_s'])} is after the last step), and none of its steps 2-"
        f"{len(zb['step_times_s']) - 1} was long: consistent with the cause, not a proof of it. Between full "
        f"collections it made ~6 young ones a step, {young_zb:.1f} ms in all over its timed steps.", "",
        f"The GPU-busy window (found with h100-zb): the training timer ended its steady window when training "
        f"ended, after the Trainer's closing checkpoint, so the nvidia-smi samples matched to it ran past the "
        f"last step onto an idle GPU: {rz['shift_s']} s in h100-zb, whose {zb_busy} is mostly that tail "
        f"({rz['util_tail']}). Every training run's busy figure so far is low for the same reason. From commit "
        f"2f1d6b6 the window ends where the last step ended on the GPU (the gap to the end of training is taken "
        f"from CUDA events; tested). For the runs of this session, whose samples were kept, `bench/rewindow_busy.py` "
        f"moves the window back to its last busy sample (an estimate; in brackets in the table): the H100 at "
        f"batch 16 {busy(hza, 'train_fast')} -> {busy_moved(hza, 'train_fast')} (with its 1.46 s stall), at "
        f"batch 20 {busy(hza, 'train_fast_big')} -> {busy_moved(hza, 'train_fast_big')}; one H200 "
        f"{busy(za, 'train_fast')} -> {busy_moved(za, 'train_fast')}. The goal is not claimed on an estimate; h100-zc "
        f"measures it with the corrected window (next paragraphs).", ""]


def accumulation_paragraphs(runs: dict[str, dict]) -> list[str]:
    """2-GPU scaling at 6_train.py's default of 4 micro-batches per optimizer step (h200x2-zb), and the H100's
    busy figure, the garbage-collection A/B and batch 20 with the corrected window (h100-zc)."""
    zb, zc = runs.get("h200x2-zb"), runs.get("h100-zc")
    if not zb or not zc:
        return []
    one, two = res(zb, "train_fast"), res(zb, "train_fast_2gpu")
    paired = paired_step_ms(one, two)
    sched, auto, big = (res(zc, p) for p in ("train_fast", "train_fast_autogc", "train_fast_big"))
    d_gc = paired_step_ms(sched, auto)
    window = lambda r: r["samples_per_s_window"]  # noqa: E731
    young = lambda r: statistics.fmean(ms for step, n, ms in r["gc_young"]  # noqa: E731
                                       if r["warmup_steps"] <= step < len(r["step_times_s"]))
    return [
        f"2 GPUs at the default accumulation (h200x2-zb). Every 2-GPU figure above ran `--grad-accum 1`, one "
        f"gradient all-reduce per micro-batch: the worst case for scaling. `6_train.py`'s default is 4 micro-"
        f"batches per optimizer step, and under DDP the Trainer runs the first three under `no_sync`, so the "
        f"ranks meet once per {one['samples_per_step']} samples per rank instead of 16, and the cost of their unequal "
        f"batches is spread over four. With that default (`gpu_bench.py --grad-accum 4`, same call, 2 H200s): one GPU "
        f"{one['samples_per_s']} samples/s ({window(one)} over the whole window), two {two['samples_per_s']} "
        f"({window(two)}): {two['samples_per_s'] / one['samples_per_s']:.2f}x by the median step, "
        f"{window(two) / window(one):.2f}x by the window. Step by step, two ranks minus one GPU: median "
        f"{statistics.median(paired):+.0f} ms of a ~{1e3 * one['median_interval_s']:.0f} ms step "
        f"({sum(d > 0 for d in paired)} of {len(paired)} steps slower; the ranks' batches are not the one GPU's, "
        f"so single steps differ by up to ~{max(abs(d) for d in paired):.0f} ms either way). GPU busy "
        f"{busy(zb, 'train_fast')} on one GPU and {busy(zb, 'train_fast_2gpu')} on two. The step-cost fit is left "
        f"out here: it prices one batch per step.", "",
        f"The H100 with the corrected busy window (h100-zc, batch 16, `--grad-accum 1`, 30 steps): "
        f"{sched['samples_per_s']} samples/s, {busy(zc, 'train_fast')} busy by nvidia-smi over the timed steps "
        f"(88.5% in h100-z was the old window). Batch 20 in the same call: {big['samples_per_s']} samples/s by the "
        f"median step ({big['samples_per_s'] / sched['samples_per_s'] - 1:+.1%}), {window(big)} against "
        f"{window(sched)} over the window ({window(big) / window(sched) - 1:+.1%}), {busy(zc, 'train_fast_big')} "
        f"busy, {big['train_peak_gib']} GiB peak ({big['train_peak_reserved_gib']} reserved).", "",
        f"Garbage collection A/B (h100-zc, same batches): the scheduled collector (the default) "
        f"{sched['samples_per_s']} samples/s by the median step, {window(sched)} over the window; the automatic one "
        f"{auto['samples_per_s']} and {window(auto)}. Step by step, automatic minus scheduled: "
        f"{statistics.median(d_gc):+.0f} ms (median; mean {statistics.fmean(d_gc):+.0f} ms; "
        f"{sum(d < 0 for d in d_gc)} of {len(d_gc)} steps faster with the automatic one). So the schedule gains "
        f"nothing in a 30-step run, and may cost ~2% (within the noise between steps). Neither run stalled (long "
        f"steps: scheduled {', '.join(long_steps(sched)) or 'none'}, automatic {', '.join(long_steps(auto)) or 'none'}). "
        f"With the automatic collector no full collection fell in the timed steps: "
        f"{len(auto['gc_full'])} full ones during step {', '.join(sorted({str(st) for st, ms in auto['gc_full']}))} "
        f"(compiling; {', '.join(f'{ms:.0f}' for st, ms in auto['gc_full'])} ms), and young ones "
        f"{young(auto):.1f} ms a step. This run neither shows the stalls of earlier calls nor ties them to the "
        f"collector. The schedule stays the default: it costs nothing clearly measurable, and it keeps a full "
        f"collection of 0.3-1.0 s on the 3B (h100-zb, h100-zc) out of the steps, where under torchrun it would "
        f"hold every rank.", ""] + busy_between_hosts(runs)


def floor_run(runs: dict[str, dict], with_profile: bool = False) -> tuple[str, dict]:
    """(label, floor result) of the newest run that timed the prefill's floor with the padded vision MLP; with
    with_profile, of the newest that also profiled the pipeline's own prefill in the same call."""
    have = [(label, res(r, "floor")) for label, r in runs.items() if res(r, "floor").get("vision_mlp_unpadded")
            and (not with_profile or (res(r, "profile_infer").get("plain") or {}).get("kernel_kinds_ms"))]
    return (have or [("", {})])[-1]


def floor_at(f: dict, tokens: float) -> float:
    """The floor (ms a batch) at another mean prompt length: the language model's GEMMs scale with the tokens, its
    causal attention with their square; the vision tower's and the LM head's do not change."""
    x = tokens / f["prompt_tokens"]
    fixed = sum(g["bf16_ms"] * g["calls"] for g in f["gemms"] + f["attention"]
                if not g["part"].startswith("LM") or "head" in g["part"])
    lm = sum(g["bf16_ms"] * g["calls"] for g in f["gemms"] if g["part"].startswith("LM") and "head" not in g["part"])
    attn = sum(a["bf16_ms"] * a["calls"] for a in f["attention"] if a["part"].startswith("LM"))
    return fixed + lm * x + attn * x * x


def lm_to_vision_elementwise(f: dict) -> float:
    """How many more elements the language model's norms and SwiGLU pass over in the floor's prefill than the
    vision tower's (hidden size twice and MLP width three times, per token or patch, per layer), from the shapes
    the floor timed."""
    def elements(part: str) -> float:
        g = next(x for x in f["gemms"] if x["part"] == part)  # gate+up: M rows, K hidden, N MLP width, 2 a layer
        return g["M"] * (2 * g["K"] + 3 * g["N"]) * g["calls"] / 2
    return elements("LM gate+up") / elements("vision gate+up")


def floor_section(runs: dict[str, dict]) -> list[str]:
    """The prefill's GEMMs and attention alone, timed at their shapes (bench/gpu_prefill_floor.py), and the
    pipeline's own prefill set against it."""
    label, f = floor_run(runs)
    if not f:
        return []
    s = f["summary"]
    rows = (f["gemms"] + [dict(u, part=u["part"] + " (as the model has it: 3,420)") for u in f["vision_mlp_unpadded"]]
            + f.get("fused", []) + f["attention"])
    L = [f"### The prefill's floor (`bench/gpu_prefill_floor.py`, {label}, {f['device']})", "",
         f"Every matmul and attention call of one inference batch ({f['rows']} rows x {f['prompt_tokens']} padded "
         f"tokens, 448 px images), each timed alone at its own shape (CUDA events, median of 20), back to back: "
         f"what a prefill would cost if norms, rotary, activations, copies and launch gaps were free.", "",
         "| part | M x K x N (attention: B x heads x L x head dim) | calls per batch | bf16 ms a call | bf16 TFLOP/s | "
         "FP8 ms a call | FP8 TFLOP/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for g in rows:
        L.append(table_row(g))
    text = (f"Sum: GEMMs {s['gemm_bf16_ms']} ms ({s['gemm_tflop']} TFLOP), attention {s['attention_ms']} ms: a floor of "
            f"{s['floor_bf16_ms']} ms per batch; with the {s['decode_ms']:.0f} ms of graphed decoding measured in "
            f"h100-q, at most **{s['ceiling_bf16_samples_per_s']} samples/s** in bf16 on this card.")
    at = res(runs[label], "floor_601").get("summary")
    if at:
        text += (f" At 601 tokens a row (the real-length batches of h100-zj), same call: {at['floor_bf16_ms']} ms, "
                 f"{at['ceiling_bf16_samples_per_s']} samples/s.")
    text += (f" With the vision MLP as the model has it the GEMMs take {s['gemm_bf16_ms_unpadded']} ms: its "
             f"{s['vision_mlp_bf16_ms_unpadded']} ms become {s['vision_mlp_bf16_ms']} when padded.")
    if "fused_projections_saving_ms" in s:
        text += (f" The projections that share an input as one GEMM per group (q/k/v, gate/up) would change the "
                 f"floor by {-s['fused_projections_saving_ms']:+.1f} ms: no saving, so the floor does not hinge on "
                 f"how the layers are split.")
    text += (f" FP8 GEMMs (not built; they round differently from bf16, so predictions would no longer equal the "
             f"plain path's; K and N padded to multiples of 16, as FP8 needs) would lower the floor to "
             f"{s['floor_fp8_ms']} ms, {s['ceiling_fp8_samples_per_s']} samples/s.")
    L += ["", text]
    plabel, pf = floor_run(runs, with_profile=True)
    if pf:
        L += ["", same_call_comparison(runs, plabel, pf)]
    return L + [""]


def same_call_comparison(runs: dict[str, dict], label: str, f: dict) -> str:
    """The pipeline's own prefill against the floor timed in the same call, by kernel kind."""
    s, prof = f["summary"], res(runs[label], "profile_infer")
    kinds = prof["plain"]["kernel_kinds_ms"]
    total = sum(kinds.values())
    share = lambda k: f"{100 * kinds.get(k, 0) / total:.0f}%"  # noqa: E731
    tokens = res(runs[label], "infer_fast").get("prompt_tokens_mean") or f["prompt_tokens"]
    scaled = floor_at(f, tokens)
    vision_fused = kinds.get("fused (triton)", 0) / prof["units"]  # per batch of 64 images, any text length
    lm_fused = vision_fused * lm_to_vision_elementwise(f)
    best = f["rows"] / ((scaled + vision_fused + lm_fused + s["decode_ms"]) / 1000)
    return (f"Against the pipeline's own prefill, in one call ({label}: floor {s['floor_bf16_ms']} ms at "
            f"{f['prompt_tokens']} tokens, {s['ceiling_bf16_samples_per_s']} samples/s): {prof['prefill_ms_median']:.0f} "
            f"ms (median over {prof['batches_in_medians']} batches of real lengths, {tokens} tokens a row on average; "
            f"the floor at that length, the language model's part scaled by it: {scaled:.0f} ms), so the prefill runs "
            f"at {scaled / prof['prefill_ms_median']:.0%} of the floor's speed. The profiled batches' kernel time by "
            f"kind (`bench/trace_gaps.py`): GEMMs {share('gemm')}, eager elementwise work and copies "
            f"{share('elementwise / copy (eager)')} ({kinds['elementwise / copy (eager)']:.0f} ms in two batches: the "
            f"language model's norms, rotary, SwiGLU, residual adds and casts, run eagerly because the decode steps "
            f"share its layers), attention {share('attention')}, fused Triton kernels (the compiled vision blocks' "
            f"norms, rotary and SwiGLU) {share('fused (triton)')}. That work cannot vanish: the vision tower's, fused "
            f"by torch.compile, takes {vision_fused:.0f} ms a batch; the language model's, fused as well, would take "
            f"~{lm_fused:.0f} ms (scaled by the elements its norms and SwiGLU pass over). With both and the decode, "
            f"the best a bf16 prefill could do is ~{best:.0f} samples/s. `--compile vision+mlp` fuses part of the "
            f"language model's share (an option: bf16 rounding moves near-tied predictions).")


def needs_row(runs: dict[str, dict], lm_only: float) -> str:
    """The lever row of what 120 inference samples/s would need, closed by the measured floor when there is one."""
    row = (f"| what 120 samples/s needs | - | the prefill alone is 686 ms per 64 rows (h100-q, ~93 samples/s if nothing "
           f"else ran), GPU-bound at ~95% busy; the language model's eager prefill runs {lm_only:.0f} samples/s at "
           f"608 tokens. `bench/prefill_flops.py`: a batch of 64 at 615 padded tokens is 308 TFLOP of matmuls (218 "
           f"language model, 84 vision tower), so 686 ms is 449 TFLOP/s; 120 samples/s leaves 457 ms after the 76 "
           f"ms of decoding, 673 TFLOP/s through the whole prefill (68% of the H100's dense bf16 peak, elementwise "
           f"work included).")
    label, f = floor_run(runs)
    if not f.get("vision_mlp_unpadded"):
        return row + (" It needs a faster prefill (FP8 matmuls, fused elementwise work, packing without padding), not "
                      "a faster decode or data path | open |")
    s = f["summary"]
    return row + (f" Measured ({label}, `bench/gpu_prefill_floor.py`): the prefill's GEMMs and attention alone, each at "
                  f"its own shape with cuBLAS and flash attention, take {s['floor_bf16_ms']} ms a batch, so even with "
                  f"every other kernel and gap free a batch costs {s['floor_bf16_ms'] + s['decode_ms']:.0f} ms: "
                  f"{s['ceiling_bf16_samples_per_s']} samples/s at most in bf16. 120 is out of reach with predictions "
                  f"equal to the bf16 path's; FP8 GEMMs would raise that ceiling to {s['ceiling_fp8_samples_per_s']} "
                  f"at the price of different rounding | not reachable in bf16 (the ceiling, measured) |")


def phase_order_ms(runs: dict[str, dict]) -> tuple[float, float] | None:
    """(order, padding): ms a step that being the call's second training phase, and padding the vision MLP, add,
    from the same A/B run in both orders (h100-zk: padded first; h100-zl: unpadded first), by paired medians."""
    zk, zl = runs.get("h100-zk", {}), runs.get("h100-zl", {})
    pairs = [(res(zk, "train_fast"), res(zk, "train_fast_unpadded")), (res(zl, "train_fast_unpadded"), res(zl, "train_fast"))]
    if not all(a and b for a, b in pairs):
        return None
    d_k, d_l = (statistics.median(paired_step_ms(a, b)) for a, b in pairs)  # second minus first
    return (d_k + d_l) / 2, (d_l - d_k) / 2


def machine_first_sentence(runs: dict[str, dict]) -> str:
    """The phase-order bias located: the same train_fast on one H100 in its first call (h100-zn) and its next
    (h100-zo, warm machine), over the same batches."""
    first, later = res(runs.get("h100-zn", {}), "train_fast"), res(runs.get("h100-zo", {}), "train_fast")
    cpp = res(runs.get("h100-zo", {}), "train_fast_cpp")
    if not first or not later or not cpp:
        return ""
    d, c = paired_step_ms(first, later), paired_step_ms(later, cpp)
    return (f" Where it lies: one H100 ran the same `train_fast` over the same batches as the first training phase of "
            f"its first call (h100-zn) and as the second of its next (h100-zo, the machine kept warm): "
            f"{statistics.median(d):+.0f} ms a step the second time ({sum(x < 0 for x in d)} of {len(d)} steps "
            f"faster); in h100-zo the call's first phase (`train_fast_cpp`) ran no slower than its second "
            f"({statistics.median(c):+.0f} ms a step against it). So the bias belongs to a machine's first training "
            f"run, not to the order inside a call (what differs: the first run compiles into an empty Inductor "
            f"cache, later runs load from it; the cause within that is not located).")


def cpp_wrapper_row(runs: dict[str, dict]) -> str:
    """The lever row of Inductor's C++ wrapper, measured on one H100 in two calls (h100-zn, h100-zo)."""
    lever = ("| Inductor's C++ wrapper for the compiled blocks (`TORCHINDUCTOR_CPP_WRAPPER=1`): each kernel launched "
             "from C++ instead of the generated Python | the training step is launch-bound on most H100 hosts "
             "(h100-zg's trace: 32 ms of the 116 ms idle in two steps fall while the host launches kernels inside "
             "the compiled blocks); less host time per launch keeps the queue fuller. Compiling takes longer | ")
    zn, zo = runs.get("h100-zn", {}), runs.get("h100-zo", {})
    fast, cpp = res(zo, "train_fast"), res(zo, "train_fast_cpp")
    if not fast or not cpp:
        return lever + "not run on the GPU | not yet |"
    d = paired_step_ms(fast, cpp)
    cold = (zn.get("train_fast_cpp") or {}).get("status", "")
    return lever + (
        f"h100-zo (the same batches, the C++ wrapper first, on a machine already warm from h100-zn, so neither "
        f"phase carries the first-run bias): step by step {statistics.median(d):+.0f} ms (median; "
        f"{sum(x < 0 for x in d)} of {len(d)} faster); {fast['samples_per_s']} -> {cpp['samples_per_s']} samples/s by "
        f"the median interval, which overstates it (the intervals are bimodal, long and short batches); busy "
        f"{busy(zo, 'train_fast')} -> {busy(zo, 'train_fast_cpp')}; losses within "
        f"{loss_gap(fast, cpp):.3f}. Cold (h100-zn, an empty cache): the first step compiled "
        f"~131 s against {res(zn, 'train_fast')['first_step_s']:.0f} s, and the phase {cold} before its 30 steps | "
        f"no: ~1%, within the noise, for a slower compile |")


def graphs_replay(run: dict) -> dict | None:
    """train_fast_graphs against train_fast in one call, over the same batches: the steps the graphs replay (a
    padded length's third step on) and the steps they record (its second), step by step; GPU busy over the
    replayed steps from `step_busy`, weighted by each step's time."""
    fast, graphs = res(run, "train_fast"), res(run, "train_fast_graphs")
    if not fast or not graphs:
        return None
    shapes, intervals = graphs["batch_shapes"], graphs["interval_times_s"]
    warmup, done = graphs["warmup_steps"], len(intervals)
    replayed = [k for k in repeated_length_steps(shapes, intervals, warmup, done) if fast["interval_times_s"][k]]
    lengths = [n for _, n in shapes[:done]]
    recorded = [k for k in range(warmup, done) if lengths[:k].count(lengths[k]) == 1]

    def busy_over(phase: str, steps: list[int]) -> float | None:
        per_step, times = run[phase].get("step_busy") or [], run[phase]["result"]["interval_times_s"]
        got = [(per_step[k - warmup], times[k]) for k in steps if k - warmup < len(per_step) and per_step[k - warmup]]
        return sum(u * t for u, t in got) / sum(t for _, t in got) if got else None

    d = [1e3 * (graphs["interval_times_s"][k] - fast["interval_times_s"][k]) for k in replayed]

    def change_pct(keep) -> float:
        return 100 * statistics.median(graphs["interval_times_s"][k] / fast["interval_times_s"][k] - 1
                                       for k in replayed if keep(lengths[k]))

    rate = {side: 16 * len(replayed) / sum(r["interval_times_s"][k] for k in replayed)
            for side, r in (("fast", fast), ("graphs", graphs))}
    return {"steps": len(replayed), "median_ms": statistics.median(d), "faster": sum(x < 0 for x in d),
            "short_pct": change_pct(lambda n: n <= 448), "longest_pct": change_pct(lambda n: n == max(lengths)),
            "rate_fast": rate["fast"], "rate_graphs": rate["graphs"],
            "busy_fast": busy_over("train_fast", replayed), "busy_graphs": busy_over("train_fast_graphs", replayed),
            "lengths": len(set(lengths)), "recorded": len(recorded),
            "record_s": statistics.median(graphs["interval_times_s"][k] for k in recorded),
            "graphs_first": list(run).index("train_fast_graphs") < list(run).index("train_fast"),
            "loss_gap": loss_gap(fast, graphs), "first_step_s": (fast["first_step_s"], graphs["first_step_s"])}


def floats_row(runs: dict[str, dict]) -> str:
    """The lever row of the float attributes compiled as constants (h100-zt: train_fast_floats, then train_fast;
    the first steps of h100-zr and h100-zs beside it, where train_fast_graphs has the constants too)."""
    lever = ("| the model's float attributes compiled as constants in every compiled block (`--float-constants`, "
             "`torch._dynamo.config.specialize_float`) | a training forward wraps ~460 Python floats (RMSNorm eps, "
             "attention and LoRA scalings) into 0-d CPU tensors for the compiled blocks to read back with "
             "`.item()`: 0.06-0.12 ms of host time a decoder layer, forward and backward (measured on the CPU in "
             "two sessions, `bench/float_constants_cpu.py`), 2.5-4 ms of a ~300 ms step, ~1%; and Inductor builds C++ "
             "kernels for those CPU nodes at the first compile, so a shorter cold compile | ")
    zt = runs.get("h100-zt", {})
    floats, plain = res(zt, "train_fast_floats"), res(zt, "train_fast")
    if not floats or not plain:
        return lever + "not run on a GPU | not yet |"
    firsts = "; ".join(f"{label}: {res(runs[label], 'train_fast_graphs')['first_step_s']:.0f} s with them "
                       f"(`train_fast_graphs`) against {res(runs[label], 'train_fast')['first_step_s']:.0f} s"
                       for label in ("h100-zr", "h100-zs") if res(runs.get(label, {}), "train_fast_graphs"))
    others = ", ".join(str(res(runs[label], "train_fast")["samples_per_s"]) for label in ("h100-zr", "h100-zs")
                       if label in runs)
    paired = paired_floats(runs)
    return lever + (
        f"h100-zt, the same batches, constants first: the first step (compile) {floats['first_step_s']:.0f} s "
        f"against {plain['first_step_s']:.0f} s (the second phase, compiling its own graphs); {firsts}. The step "
        f"rate: {floats['samples_per_s']} samples/s with them over {floats['timed_steps']} steps, in the range of "
        f"the other H100s' `train_fast` ({others}); "
        f"the A/B's other side was cut by its phase limit after {plain['steps_done']} steps, its longer compile "
        f"having eaten the time, so no paired figure there. The first two steps' losses equal h100-zs's `train_fast` "
        f"to the bit (later ones part: this call ran 40 steps, a different learning-rate schedule); the same "
        f"losses on the CPU dry run (small model, `--compile all`); a test traces the blocks and finds no "
        f"`.item()` reads left; the constants are fixed per model, so nothing recompiles. {paired}"
        f"| yes, default from commit {FLOATS_DEFAULT_COMMIT} (hf backend): 50-90 s off every training run's start"
        f"{' and ~5% off its steps' if paired else ''}; `--no-float-constants` restores PyTorch's "
        f"default |")


def aba_steps(run: dict, a_phase: str, b_phase: str, a2_phase: str) -> dict | None:
    """An A-B-A call (the same batches three times): the step-by-step medians, ms, of B - A, B - A2 and A2 - A over
    the timed steps all three ran, with the three phases' results."""
    a, b, a2 = (res(run, phase) for phase in (a_phase, b_phase, a2_phase))
    if not a or not b or not a2 or not b.get("train_finished"):
        return None
    steps = [k for k in range(a["warmup_steps"], len(b["interval_times_s"]))
             if all(x["interval_times_s"][k] for x in (a, b, a2))]

    def ms(x, y) -> float:
        return 1e3 * statistics.median(y["interval_times_s"][k] - x["interval_times_s"][k] for k in steps)

    def rate(x) -> float:  # over the whole window: 16 / median step swings with which length is the median one
        return round(x["samples_per_step"] * len(steps) / sum(x["interval_times_s"][k] for k in steps), 2)

    return {"a": a, "b": b, "a2": a2, "steps": len(steps), "b_minus_a": ms(a, b), "b_minus_a2": ms(a2, b),
            "a2_minus_a": ms(a, a2), "rates": (rate(a), rate(b), rate(a2))}


def paired_floats(runs: dict[str, dict]) -> str:
    """h100-zy: train_fast, train_fast_dynamic_floats, train_fast_again (A-B-A) over the same batches."""
    zy = runs.get("h100-zy", {})
    p = aba_steps(zy, "train_fast", "train_fast_dynamic_floats", "train_fast_again")
    if not p:
        return ""
    a, b, a2 = p["a"], p["b"], p["a2"]
    return (f"The paired step rate (h100-zy, A-B-A over the same {p['steps']} timed steps): {a['samples_per_s']} "
            f"with the constants, {b['samples_per_s']} without, {a2['samples_per_s']} with them again; step by "
            f"step {p['b_minus_a']:+.0f} and {p['b_minus_a2']:+.0f} ms without them (medians against either side; "
            f"the two sides with them {p['a2_minus_a']:+.0f} ms apart): more than the CPU's estimate of the "
            f"`.item()` reads (~3 ms); on a launch-bound host the host's time counts in full, and the kernels "
            f"compiled around constants may differ too (not separated); the first step {a['first_step_s']:.0f} s "
            f"against {b['first_step_s']:.0f}; losses equal at the first step ({a['loss_first']:.4f}). That host was "
            f"a slow one ({busy(zy, 'train_fast')} and {busy(zy, 'train_fast_again')} busy with them; the phase "
            f"without them hit its time limit in the closing evaluation, after all its steps) ")


def infer_floats_row(runs: dict[str, dict]) -> str:
    """The lever row of the float constants in 7_infer.py's compiled vision blocks: h100-zu (plain first) and h100-zv
    (constants first), phases infer_fast and infer_fast_floats, the same 640 rows."""
    pairs = [(label, res(runs.get(label, {}), "infer_fast"), res(runs.get(label, {}), "infer_fast_floats"))
             for label in ("h100-zu", "h100-zv")]
    pairs = [(label, plain, floats) for label, plain, floats in pairs if plain and floats]
    lever = ("| the float constants in inference too (`7_infer.py --float-constants`: its compiled vision blocks, 3 "
             "floats each) | as in training, a shorter first compile; no change in steady state, where a batch reads "
             "96 floats (32 blocks x 3), well under a millisecond | ")
    if len(pairs) < 2:
        return lever + "not run on a GPU in both orders | no: option until measured |"
    first = [floats["first_batch_s"] - plain["first_batch_s"] for _, plain, floats in pairs]
    equal = " and ".join(f"{e['equal_price']}/{e['rows']}" for e in
                         (runs[label]["equality"]["infer_fast vs infer_fast_floats"] for label, _, _ in pairs))

    def order(label: str) -> str:
        phases = list(runs[label])
        return "constants second" if phases.index("infer_fast") < phases.index("infer_fast_floats") else \
            "constants first"

    text = "; ".join(
        f"{label} ({order(label)}): first batch (compile) {plain['first_batch_s']} -> {floats['first_batch_s']} "
        f"s, the job {plain['total_s']} -> {floats['total_s']} s, {plain['samples_per_s']} -> "
        f"{floats['samples_per_s']} samples/s" for label, plain, floats in pairs)
    return lever + (
        f"{text}. The phase order moves the first batch more than the setting does (a call's second phase "
        f"finds Triton's kernels built): averaged over both orders the constants take "
        f"{-statistics.mean(first):.1f} s off the first batch; the steady rate is unchanged. Predictions "
        f"{equal} equal, texts too | yes, default from commit {INFER_FLOATS_COMMIT} (hf backend), so both stages "
        f"compile alike; `--no-float-constants` restores PyTorch's default |")


def vision_indices_row(runs: dict[str, dict]) -> str:
    """The training forward taking the collator's vision indices again (commit 18d516a), found in h100-zx's sampled
    train_fast steps; measured A-B-A in h100-zz (train_fast_device_indices, train_fast, ..._again)."""
    zx = runs.get("h100-zx", {})
    if not res(zx, "train_fast"):
        return ""
    lever = ("| the training forward takes the collator's vision indices (rotary positions, attention and window "
             "boundaries) again: from commit e3da4db the image merge that skips the read-backs passed them on under "
             "their `image_` names, which the tower does not take, so it rebuilt them on the GPU every step, reading "
             "the grids back (a regression, fixed in commit 18d516a; `--no-host-vision-indices` restores it for the "
             "A/B) | h100-zx's `train_fast`, host stacks sampled: ~50 ms of each ~320 ms step's host time in the "
             "tower's index building (`get_vision_position_ids` and the tower's forward), part of it waiting at the "
             "read-backs for the GPU to drain: between 0 and ~15% a step on a launch-bound host | ")
    zz = runs.get("h100-zz", {})
    p = aba_steps(zz, "train_fast_device_indices", "train_fast", "train_fast_device_indices_again")
    if not p:
        return lever + ("not yet measured on a GPU; every training figure above from commit e3da4db to 18d516a was "
                        "taken with the regression | yes, default (exact: a test checks the tower takes all three "
                        "kinds of indices and the loss equals the library's path) |")
    a, b, a2 = p["a"], p["b"], p["a2"]
    seg = lambda x, part: f"{x['segments_ms'][part]:.0f}"  # noqa: E731
    return lever + (
        f"h100-zz (commit {zz['commit']}), A-B-A over the same {p['steps']} timed steps: {p['rates'][0]} "
        f"samples/s rebuilding them on the GPU, {p['rates'][1]} taking the collator's, {p['rates'][2]} rebuilding "
        f"them again ({100 * (p['rates'][1] / p['rates'][0] - 1):+.0f}% and "
        f"{100 * (p['rates'][1] / p['rates'][2] - 1):+.0f}%; by the median step {a['samples_per_s']}, "
        f"{b['samples_per_s']} and {a2['samples_per_s']}); step by step {p['b_minus_a']:+.0f} and "
        f"{p['b_minus_a2']:+.0f} ms (medians against either side; the two rebuilding sides {p['a2_minus_a']:+.0f} ms "
        f"apart). The forward's median {seg(b, 'forward')} ms against {seg(a, 'forward')} and {seg(a2, 'forward')}, "
        f"the backward's {seg(b, 'backward')} against {seg(a, 'backward')} and {seg(a2, 'backward')}; GPU busy "
        f"{busy(zz, 'train_fast')} against {busy(zz, 'train_fast_device_indices')} and "
        f"{busy(zz, 'train_fast_device_indices_again')}; first-step losses equal ({b['loss_first']:.4f}). Every "
        f"training figure above from commit e3da4db to 18d516a was taken with the regression | yes, default "
        f"(exact: a test checks the tower takes all three kinds of indices and the loss equals the library's "
        f"path) |")


def lora_groups_row(runs: dict[str, dict]) -> str:
    """The LoRA projections that share an input run as one group each (commit fdb107f): h100-zza (A-B-A with the
    groups as B, before the .to() fix that kept the base weights in one copy), h100-zzb (the groups as the default,
    A-B-A with peft's layers as B)."""
    lever = ("| the LoRA projections that read the same input run as one group each (`--lora-groups`, "
             "`common/lora_fusion.py`): in every decoder layer q/k/v and gate/up each take one GEMM for their frozen "
             "base weights (stacked once, the layers' weights views into the stack), one for their stacked A and "
             "one for their B laid block-diagonally; peft's math and parameters | a decoder layer's q/k/v and gate/up "
             "LoRA layers run 40 GEMMs a step (forward and backward), each reading or writing a tensor of the "
             "input's size; grouped, ~20: fewer launches on a launch-bound host and fewer passes over the "
             "activations | ")
    za = runs.get("h100-zza", {})
    first = aba_steps(za, "train_fast", "train_fast_lora_groups", "train_fast_again")
    if not first:
        return lever + "not run on a GPU | no |"
    a, b, a2 = first["a"], first["b"], first["a2"]
    text = (f"h100-zza (commit {za['commit']}, the groups as B): {' / '.join(map(str, first['rates']))} samples/s "
            f"over the same {first['steps']} timed steps ({a['samples_per_s']} / {b['samples_per_s']} / "
            f"{a2['samples_per_s']} by the median step, which swings with the batch length that falls in the "
            f"middle), step by step {first['b_minus_a']:+.0f} and {first['b_minus_a2']:+.0f} ms with the groups "
            f"(medians against either side; the two sides without {first['a2_minus_a']:+.0f} ms apart). Memory: {b['memory_before_train_gib']} GiB before training "
            f"against {a['memory_before_train_gib']}, the Trainer's move to the GPU having copied the stacked "
            f"weights and their views apart (fixed: the groups view the moved stack again, tested)")
    zb = runs.get("h100-zzb", {})
    second = aba_steps(zb, "train_fast", "train_fast_ungrouped", "train_fast_again")
    if not second:
        return lever + text + " | yes, default on a GPU from commit 17cc438 (hf backend); not yet measured after the fix |"
    a, b, a2 = second["a"], second["b"], second["a2"]
    text += (f". h100-zzb (commit {zb['commit']}, the groups the default, peft's layers as B): "
             f"{' / '.join(map(str, second['rates']))} over the whole window, step by step {-second['b_minus_a']:+.0f} and "
             f"{-second['b_minus_a2']:+.0f} ms with the groups (the two grouped sides {second['a2_minus_a']:+.0f} ms "
             f"apart); memory before training {a['memory_before_train_gib']} GiB against {b['memory_before_train_gib']}"
             f", peak {a['train_peak_gib']} and {a2['train_peak_gib']} against {b['train_peak_gib']}; GPU busy "
             f"{busy(zb, 'train_fast')} and {busy(zb, 'train_fast_again')} against {busy(zb, 'train_fast_ungrouped')}"
             f"; first-step losses {a['loss_first']:.4f} and {b['loss_first']:.4f}")
    text += (". Not measured on a GPU since: commit 622b988 (after a review, each grouped forward first checks that "
             "its group still qualifies, and falls back to peft's layers once an adapter is disabled, merged or "
             "unloaded: the same math, and under torch.compile the check becomes guards, with no graph break, tested)"
             " and dd5facc (the `auto` default)")
    return lever + text + (" | yes, default on a GPU (hf backend; from commit 17cc438, `--lora-groups auto`: off on "
                           "the CPU, whose fp32 results stay the library's to the bit); `--lora-groups off` for "
                           "peft's layers |")


def graphs_row(runs: dict[str, dict]) -> str:
    """The lever row of CUDA graphs over the compiled blocks in training: h100-zp crashed, h100-zq located it,
    h100-zr and h100-zs (both phase orders) measured it after the fix."""
    lever = ("| CUDA graphs over the compiled blocks in training (`--cuda-graphs`: torch.compile's reduce-overhead "
             "mode, batch lengths padded to a multiple of 32 so that few shapes are recorded, `--pad-multiple`) | "
             "h100-zg's trace: 116 ms idle in 841 ms, in hundreds of gaps while the host issues ~5,400 kernels a "
             "step; replayed graphs issue a block's kernels in one launch: up to ~10% a step and busy above 90% "
             "on any host | ")
    zp = runs.get("h100-zp", {})
    crash = (zp.get("train_fast_graphs") or {})
    pairs = [(label, graphs_replay(runs[label])) for label in ("h100-zr", "h100-zs") if label in runs]
    pairs = [(label, g) for label, g in pairs if g]
    if not crash and not pairs:
        return lever + "not run on a GPU | no |"
    history = (
        f"First run (h100-zp, commit 1585667): {crash.get('status')} after {crash.get('seconds')} s, in the "
        f"first step's compile, with no Python traceback. Stack dumps in a diagnostic call (h100-zq, "
        f"`bench/gpu_runs/h100-zq-stacks.txt`) found it in Inductor's C++ build for the first vision block's CPU "
        f"nodes: with dynamic shapes Dynamo passes every float attribute as a 0-d CPU tensor read with `.item()`, "
        f"10 per decoder layer (two RMSNorm eps, the attention scaling, seven LoRA scalings) and 3 per vision "
        f"block, inputs a CUDA graph cannot hold. From commit ef9fd6a `--cuda-graphs` compiles them as constants "
        f"(`torch._dynamo.config.specialize_float`; a test traces the blocks and finds no such reads). ")
    if not pairs:
        return lever + history + "Not yet rerun on a GPU | no: experimental option until measured |"

    def both(fmt, key) -> str:
        return " and ".join(fmt(g[key]) for _, g in pairs)

    g0 = pairs[0][1]
    ms = statistics.mean(abs(g["median_ms"]) for _, g in pairs)
    record = statistics.mean(g["record_s"] for _, g in pairs)
    lengths, steps = 50, 75_000 // 16  # real catalog rows at a multiple of 32; one epoch of 75k rows at batch 16
    order = " and ".join(f"{label} (graphs {'first' if g['graphs_first'] else 'second'})" for label, g in pairs)
    rates = " and ".join(f"{g['rate_fast']:.2f} -> {g['rate_graphs']:.2f}" for _, g in pairs)
    gains = " and ".join(f"{100 * (g['rate_graphs'] / g['rate_fast'] - 1):+.1f}%" for _, g in pairs)
    busies = " and ".join(f"{g['busy_fast']:.1f}% -> {g['busy_graphs']:.1f}%" for _, g in pairs)
    whole = " and ".join(f"{res(runs[label], 'train_fast')['samples_per_s']} -> "
                         f"{res(runs[label], 'train_fast_graphs')['samples_per_s']}" for label, _ in pairs)
    firsts = " and ".join(f"{g['first_step_s'][1]:.0f} s against {g['first_step_s'][0]:.0f}" for _, g in pairs)
    measured = (
        f"After it, {order}, the same 50 batches, on the {g0['steps']} steps the graphs replayed (a padded "
        f"length's third step on): step by step {both(lambda x: f'{x:+.0f}', 'median_ms')} ms (medians; "
        f"{both(str, 'faster')} of {g0['steps']} faster), {rates} samples/s over those steps ({gains}); a step "
        f"{both(lambda x: f'{x:+.0f}%', 'short_pct')} at 352-448 tokens, {both(lambda x: f'{x:+.1f}%', 'longest_pct')} "
        f"at 768 (medians). GPU busy over the same steps (nvidia-smi, "
        f"`step_busy`, one or two samples a step): {busies}, lower though the steps are shorter (not explained). "
        f"The cost: a length's first step warms up and its second records, "
        f"{both(lambda x: f'{x:.1f}', 'record_s')} s (medians of {g0['recorded']}); these runs met "
        f"{g0['lengths']} lengths in 50 steps, so over the whole phase graphs ran {whole} samples/s. The first "
        f"step (compile) took {firsts}. Losses within {max(g['loss_gap'] for _, g in pairs):.3f} (padding to 32 "
        f"reorders bf16 sums). Break-even: at ~{ms:.0f} ms a replayed step, ~{lengths} lengths (the real "
        f"catalog's ~350-1,950 tokens at a multiple of 32) cost ~{lengths * record / 60:.0f} min of recording "
        f"against ~{steps * ms / 1e3 / 60:.1f} min saved over a 75k-row epoch ({steps:,} steps). ")
    verdict = ("| no: off by default and experimental; it loses on a one-epoch run, needs `--grad-accum 1` "
               "(pytorch/pytorch#169545: accumulated gradients would be the graphs' output buffers, overwritten by "
               "the next replay) and did not lift nvidia-smi's busy figure |")
    return lever + history + measured + recording_sentences(runs, ms, lengths, steps) + verdict


CHECKS = ("cudagraph_trees.py:expired", "cudagraph_trees.py:_is_alias_of_live_recorded_tensor",
          "cudagraph_trees.py:maybe_deref", "cudagraph_trees.py:_is_cuda_graph_recorded_tensor",
          "cudagraph_trees.py:data_ptr", "cudagraph_trees.py:is_live")


def recording_sentences(runs: dict[str, dict], replay_ms: float, lengths: int, steps: int) -> str:
    """Where a recording step's seconds went (h100-zv, the host's stacks sampled, bench/stack_samples.py; its stacks
    file kept beside the run) and what the cheaper alias checks (common/graph_trees.py, commit 8aeb83d) left
    (h100-zx, with train_fast beside it)."""
    zv, zx = runs.get("h100-zv", {}), runs.get("h100-zx", {})
    stacks = RUNS / "h100-zv-train_fast_graphs.stacks.txt.gz"
    after = graphs_replay(zx) if zx else None
    if not res(zv, "train_fast_graphs") or not after or not stacks.exists():
        return ""
    from stack_samples import parse, profile, record_and_replay_steps
    recorded = record_and_replay_steps(res(zv, "train_fast_graphs"))[0]
    per_step = parse(stacks)[1]
    before = profile([x for k in recorded for x in per_step.get(k, [])], top=10_000)
    own, incl = dict(before["self"]), dict(before["incl"])
    checks = sum(own.get(name, 0) for name in CHECKS)
    median_before = statistics.median(res(zv, "train_fast_graphs")["interval_times_s"][k] for k in recorded)
    sampled = zx["train_fast_graphs"]["stacks"]["record"]
    left = dict(sampled["self"])
    left_checks = sum(left.get(name, 0) for name in CHECKS) + left.get(
        "graph_trees.py:_is_alias_of_live_recorded_tensor", 0)
    cost = after["record_s"]
    return (
        f"Why recording took seconds: the host's Python stacks, sampled every 0.1 s (h100-zv, "
        f"`bench/stack_samples.py`, {len(recorded)} recording steps of median {median_before:.1f} s): of "
        f"{before['seconds']:.0f} s, {incl.get('cudagraph_trees.py:run', 0):.0f} s in the forward's graphs, "
        f"{checks:.0f} s of those in PyTorch's alias checks (`CUDAGraphNode._is_alias_of_live_recorded_tensor` and "
        f"kin), and {own.get('graph.py:_engine_run_backward', 0):.0f} s waiting on the backward, which runs in the "
        f"autograd engine's thread, unseen by that sampler. The checks compare each new graph's inputs and outputs "
        f"with every output recorded earlier on the step's path of ~100 graphs, asking each whether it is alive "
        f"(a C call) before comparing addresses: quadratic in the path, whose forwards output the activations "
        f"saved for the backward. From commit 8aeb83d `common/graph_trees.py` compares addresses first (the same "
        f"answers, tested against PyTorch's own on real storages). h100-zx, another H100, graphs first, then "
        f"`train_fast`: a recording step {cost:.2f} s (median of {after['recorded']}; {left_checks:.1f} of the "
        f"sampled {sampled['seconds']:.0f} s left in the checks, the rest CUDA syncs, the first replay, the "
        f"backward), {median_before / cost:.1f}x shorter; the replayed steps {after['rate_fast']:.2f} -> "
        f"{after['rate_graphs']:.2f} samples/s ({100 * (after['rate_graphs'] / after['rate_fast'] - 1):+.1f}%, "
        f"{after['median_ms']:+.0f} ms a step) on a host where `train_fast` ran {busy(zx, 'train_fast')} busy. "
        f"Break-even now: ~{lengths} lengths cost ~{lengths * cost / 60:.1f} min of recording against "
        f"~{steps * replay_ms / 1e3 / 60:.1f} min saved an epoch at the {replay_ms:.0f} ms a step of the slower "
        f"hosts above: graphs break even after ~{lengths * cost / (steps * replay_ms / 1e3):.0f} epochs there, and "
        f"never where the host keeps up. ")


def vision_mlp_row(runs: dict[str, dict]) -> str:
    """The lever row of the zero-padded vision MLP width."""
    _, f = floor_run(runs)
    zj = runs.get("h100-zj", {})
    padded, unpadded = res(zj, "infer_fast"), res(zj, "infer_fast_unpadded")
    order = phase_order_ms(runs)
    if not f or not padded or not unpadded or order is None:
        return ""
    s, eq = f["summary"], zj["equality"]["infer_fast vs infer_fast_unpadded"]
    return (f"| the vision MLP's width zero-padded 3,420 -> 3,456 (`--vision-mlp-multiple 128`), exact | the floor: those "
            f"GEMMs ran at ~230 TFLOP/s, {s['vision_mlp_bf16_ms_unpadded']} ms of a 64-image batch, "
            f"{s['vision_mlp_bf16_ms']} padded: up to ~{s['vision_mlp_bf16_ms_unpadded'] - s['vision_mlp_bf16_ms']:.0f} "
            f"ms an inference batch and ~{(s['vision_mlp_bf16_ms_unpadded'] - s['vision_mlp_bf16_ms']) / 4:.0f} ms a "
            f"training step of 16 images | inference (h100-zj, same rows, padded first): {unpadded['samples_per_s']} -> "
            f"{padded['samples_per_s']} samples/s, median batch {1e3 * unpadded['median_generate_s']:.0f} -> "
            f"{1e3 * padded['median_generate_s']:.0f} ms, {eq['equal_price']}/{eq['rows']} predictions equal. "
            f"Training, the same A/B in both phase orders (h100-zk, h100-zl): padding {order[1]:+.1f} ms a step, "
            f"neutral. Far less than predicted, most likely because the vision blocks are compiled and Inductor "
            f"already pads unaligned matmuls itself (`torch._inductor.config.shape_padding`, on by default), at the "
            f"cost of copies the explicit padding saves | yes, default (exact; stages 6 and 7, hf backend) |")


def padding_mask_row(runs: dict[str, dict]) -> str:
    """The lever row of causal-only training attention, predicted from h100-zg's trace, measured in h100-zh."""
    lever = ("| training attention without the padding mask (causal alone; `--padding-mask` restores it), exact for "
             "right-padded batches | h100-zg's trace of two steps (841 ms): the language model's padded batches ran "
             "SDPA's memory-efficient kernels (a 4-D mask rules out flash), 72 forward calls in 31.5 ms and 72 "
             "backward in 82.7 ms; its 36 flash calls in the same trace (head dim 128, a batch without padding) took "
             "0.19 ms a forward against 0.44 and 0.59 ms a backward against 1.15: ~58 ms of the 841, ~7% | ")
    zh = runs.get("h100-zh", {})
    masked, causal = res(zh, "train_fast"), res(zh, "train_fast_causal")
    if not masked or not causal:
        return lever + "not measured on a GPU | no: option until measured |"
    d = paired_step_ms(masked, causal)
    same = loss_gap(masked, causal)
    return lever + (
        f"h100-zh, same batches: {masked['samples_per_s']} -> {causal['samples_per_s']} samples/s "
        f"({causal['samples_per_s'] / masked['samples_per_s'] - 1:+.1%}); step by step {statistics.median(d):+.0f} ms "
        f"(median; {sum(x < 0 for x in d)} of {len(d)} faster); backward {masked['segments_ms']['backward']:g} -> "
        f"{causal['segments_ms']['backward']:g} ms, forward {masked['segments_ms']['forward']:g} -> "
        f"{causal['segments_ms']['forward']:g}; peak {masked['train_peak_gib']} -> {causal['train_peak_gib']} GiB; "
        f"first, logged and last losses within {same:.3f} of each other (bf16 kernels); busy {busy(zh, 'train_fast')} -> "
        f"{busy(zh, 'train_fast_causal')} (less GPU work for the same launches). {order_note(runs)}Same loss and "
        f"gradients on the tiny model (test) | yes, default from commit b96527e |")


def order_note(runs: dict[str, dict]) -> str:
    order = phase_order_ms(runs)
    if order is None:
        return ""
    return (f"Later runs found that a call's second training phase is {order[0]:+.1f} ms a step whatever it runs "
            f"(h100-zk, h100-zl: the same A/B in both orders), and here the lever ran second: about half of the "
            f"step's gain is that order; the backward's and the memory's are the lever's. ")


def trace_sentence(run: dict) -> str:
    """The idle gaps of two training steps traced on an H100 (h100-zg), as a sentence; empty without the trace."""
    g = run.get("train_trace_gaps")
    if not g:
        return ""
    charged = g["idle_charged_ms"]
    inside = [c for c in charged if "ompiledFxGraph" in c["host"] or "CompiledFunction" in c["host"]]
    per_step = g["kernels"] / g["windows"] / 2  # one window of 2 steps: gpu_profile.py's --units default
    return (f" A trace of two steps on another H100 (h100-zg, {busy(run, 'train_fast')} busy by nvidia-smi in the "
            f"same call; `bench/trace_gaps.py`): {g['gpu_busy_pct']}% busy over {g['wall_ms']:.0f} ms, "
            f"{g['idle_ms']:.0f} ms idle in hundreds of short gaps, the largest charge {charged[0]['ms']:.0f} ms "
            f"in {charged[0]['gaps']} gaps with no host event; {sum(c['ms'] for c in inside):.0f} ms in "
            f"{sum(c['gaps'] for c in inside)} gaps fall while the host launches kernels inside the compiled "
            f"blocks. A step is {per_step:,.0f} kernels, one every {1e3 * g['wall_ms'] / g['kernels']:.0f} us "
            f"of wall time. The GPU's queue runs dry hundreds of times a step, each time because the host, issuing "
            f"those kernels one by one, fell behind: no single part is the cause, and a slower host shows as more "
            f"idle time. Without fewer launches (CUDA graphs) that is the ceiling on these hosts.")


def busy_between_hosts(runs: dict[str, dict]) -> list[str]:
    """The training busy figure across H100 calls with the corrected window, and why it moves."""
    calls = [label for label in ("h100-z", "h100-zc", "h100-zd") if res(runs.get(label, {}), "train_fast")]
    if len(calls) < 3 or not res(runs.get("h100-ze", {}), "train_fast"):
        return []
    fast = {label: res(runs[label], "train_fast") for label in calls}
    d = paired_step_ms(fast["h100-zc"], fast["h100-zd"])
    parts = "; ".join(f"{label} forward {fast[label]['segments_ms']['forward']:g}, backward "
                      f"{fast[label]['segments_ms']['backward']:g}, {busy(runs[label], 'train_fast')} busy"
                      for label in calls)
    return [
        f"GPU busy between H100s. With the corrected window the same code and the same batches gave "
        f"{busy(runs['h100-zc'], 'train_fast')} (h100-zc), {busy(runs['h100-zd'], 'train_fast')} (h100-zd), "
        f"{busy(runs.get('h100-zg', {}), 'train_fast')} (h100-zg) and, at the default accumulation of 4, "
        f"{busy(runs['h100-ze'], 'train_fast')} (h100-ze): the 90% goal is met in one call of four. The same kernels take different GPU time on different machines (ms, medians, "
        f"identical batches; h100-z's busy is the old window's): {parts}. h100-zd's steps are "
        f"{statistics.median(d):+.0f} ms (median; {sum(x > 0 for x in d)} of {len(d)} slower) against h100-zc's. "
        f"A forward's GPU time includes the gaps where the GPU waited for the host to launch the next kernels, so "
        f"the same kernels take longer behind a slower host (or at a lower GPU clock, which nvidia-smi would "
        f"still count as busy); h100-zd's longer forward came with its lower busy figure, which points to the "
        f"host. Kernels launched one by one from eager code between the compiled blocks are what a slow host "
        f"delays. What would lift the figure on any host is fewer launches: CUDA graphs over the compiled "
        f"blocks, recorded for a fixed set of padded lengths (`--cuda-graphs`, experimental: on the steps it "
        f"replays 4-6% faster, yet nvidia-smi's busy came out lower, and each new length costs seconds to record; "
        f"see the levers).{trace_sentence(runs.get('h100-zg', {}))} /proc/cpuinfo names the hosts only as "
        f"\"{runs['h100-zf']['env'].get('cpu_model', 'unknown') if 'h100-zf' in runs else 'unknown'}\" (recorded "
        f"from commit ce5c2b2), so the bench cannot tell them apart by name.", ""]


def row(metric: str, baseline: str, ours: str, run: dict, device_note: str = "") -> tuple[str, str]:
    return metric, f"| {metric} | {baseline} | {ours} | {card(run)}{device_note} | {run['env']['started'][:10]} |"


FLOATS_DEFAULT_COMMIT = "b5056d3"
INFER_FLOATS_COMMIT = "862e53c"
# train_fast at today's defaults (the float constants aside: they leave the step rate as it was)
LATER_TRAIN = ("h100-zk", "h100-zl", "h100-zn", "h100-zo", "h100-zp", "h100-zr", "h100-zs")
LATER_FLOATS = ("h100-zw", "h100-zx", "h100-zy")  # train_fast at the float-constants default
LATER_INDICES = ("h100-zz", "h100-zza")  # train_fast with the collator's vision indices taken again (commit 18d516a)
LATER_GROUPS = ("h100-zzb",)  # train_fast with the LoRA groups (the default from commit 17cc438)


def later_train(runs: dict[str, dict]) -> str:
    """Training at the newest defaults (no padding mask, padded vision MLP), where measured without a baseline."""
    got = [(label, res(runs.get(label, {}), "train_fast")) for label in LATER_TRAIN]
    got = [(label, x) for label, x in got if x]
    if not got:
        return ""

    def era(intro: str, labels: tuple) -> str:
        found = [(label, phase, res(runs[label], phase)) for label in labels if label in runs
                 for phase in ("train_fast", "train_fast_again") if res(runs[label], phase)]
        return (intro + ", ".join(
            f"{x['samples_per_s']} ({label}{', ' + phase if phase != 'train_fast' else ''}"
            f"{', stacks sampled' if runs[label]['train_fast'].get('stacks') else ''})"
            for label, phase, x in found)) if found else ""

    return ("; at commit 73508e8 and later ones with the same defaults, no baseline in those calls: " +
            ", ".join(f"{x['samples_per_s']} ({label})" for label, x in got) +
            era("; from commit b5056d3 (float constants): ", LATER_FLOATS) +
            era("; from commit 18d516a (the collator's vision indices taken again): ", LATER_INDICES) +
            era("; from commit 17cc438 (LoRA groups): ", LATER_GROUPS))


def later_infer(runs: dict[str, dict]) -> str:
    x = res(runs.get("h100-zj", {}), "infer_fast")
    return f"; at commit 73508e8, h100-zj: {x['samples_per_s']}" if x else ""


def later_busy(runs: dict[str, dict]) -> str:
    return ", ".join(f"{busy(runs[label], phase)} ({label}, {phase})"
                     for label in LATER_TRAIN + LATER_FLOATS + LATER_INDICES + LATER_GROUPS for phase in ("train_fast", "train_fast_unpadded", "train_fast_cpp", "train_fast_again")
                     if res(runs.get(label, {}), phase))


def current_busy(runs: dict[str, dict]) -> str:
    """Training's GPU busy since the training forward takes the collator's vision indices again (commit 18d516a)."""
    got = [(label, phase, busy(runs[label], phase)) for label in LATER_INDICES + LATER_GROUPS if label in runs
           for phase in ("train_fast", "train_fast_again") if res(runs[label], phase)]
    if not got:
        return ""
    hosts = len({label for label, _, _ in got})
    values = [float(b.rstrip("%")) for _, _, b in got if b != "-"]
    return (f" at the current defaults (from commit 18d516a, the collator's vision indices taken again): "
            f"{min(values):.1f}-{max(values):.1f}% in {len(values)} phases of {hosts} calls, each a fresh H100 machine "
            f"({', '.join(f'{b} {label}' + ('' if phase == 'train_fast' else ' again') for label, phase, b in got)}; "
            f"goal 90%: met on each); before that,")


def equal_length_speed(one: list[dict], rank: list[dict]) -> float:
    """A rank's speed as a share of one GPU's at the rank's own batch lengths: the one GPU's batches after the first
    fitted as time = fixed + per-token x prompt length, that fit's time for the rank's batches over their time."""
    import numpy as np
    slope, fixed = np.polyfit([b["prompt_len"] for b in one], [b["generate_s"] for b in one], 1)
    return sum(fixed + slope * b["prompt_len"] for b in rank) / sum(b["generate_s"] for b in rank)


def later_infer_2gpu(runs: dict[str, dict]) -> str:
    """h200x2-zc (1,024 rows): the 2-GPU ratio, and each rank's speed at equal lengths (keep_equal_length_shares)."""
    zc = runs.get("h200x2-zc", {})
    one, two = res(zc, "infer_fast"), zc.get("infer_fast_2gpu") or {}
    if not one or not two.get("result") or not two.get("equal_length_shares"):
        return ""
    e1, e2 = one["samples_per_s"], two["samples_per_s_all_ranks"]
    shares, lengths = two["equal_length_shares"], two["timed_prompt_len"]
    return (f". At commit {zc['commit']} (h200x2-zc, 1,024 rows, 7 timed batches a rank): {e1} -> {e2}, "
            f"{e2 / e1:.2f}x. Each side leaves its first, shortest batch out, so the ranks' timed batches are longer: "
            f"{' and '.join(map(str, lengths[1:]))} prompt tokens against {lengths[0]}. At equal lengths each rank "
            f"ran at {' and '.join(f'{100 * x:.1f}%' for x in shares)} of the one GPU's speed (the one GPU's "
            f"batches fitted as fixed + per-token cost): ~{2 * statistics.mean(shares):.2f}x")


def later_train_2gpu(runs: dict[str, dict]) -> str:
    out = []
    for label, what in (("h200x2-zc", ""), ("h200x2-zd", ", with the vision-index fix and the LoRA groups")):
        run = runs.get(label, {})
        one, two = res(run, "train_fast"), res(run, "train_fast_2gpu")
        if one and two:
            out.append(f"at commit {run['commit']} ({label}, the default accumulation of 4{what}): "
                       f"{one['samples_per_s']} -> {two['samples_per_s']}, {ratio(two, one)}")
    return (". " + "; ".join(out)[0].upper() + "; ".join(out)[1:]) if out else ""


def ceiling_clause(runs: dict[str, dict]) -> str:
    label, f = floor_run(runs)
    if not f:
        return ""
    return (f"; its GEMMs and attention alone, at cuBLAS and flash speed, cap bf16 at "
            f"{f['summary']['ceiling_bf16_samples_per_s']} ({label}, `bench/gpu_prefill_floor.py`)")


def headline(runs: dict[str, dict]) -> list[tuple[str, str]]:
    """(metric, row) for the perf rows of the headline table."""
    rows = []
    g, old, acc = runs.get("h100-zd", {}), runs.get("h100-z", {}), runs.get("h100-ze", {})
    hf, fast = res(g, "train_hf"), res(g, "train_fast")
    if hf and fast and res(old, "train_fast") and res(acc, "train_fast"):
        pair = lambda r: (f"{res(r, 'train_hf')['samples_per_s']} -> {res(r, 'train_fast')['samples_per_s']}, "  # noqa: E731
                          f"{res(r, 'train_fast')['samples_per_s'] / res(r, 'train_hf')['samples_per_s']:.2f}x")
        rows.append(row("train samples/s", f"{hf['samples_per_s']} (transformers+peft, batch 4; 3B, real lengths)",
                        f"{fast['samples_per_s']} ({fast['samples_per_s'] / hf['samples_per_s']:.2f}x; goal 40: met. "
                        f"The same bench on other H100s: {pair(old)} (h100-z); at the default of 4 micro-batches a "
                        f"step, both sides: {pair(acc)} (h100-ze)){later_train(runs)}", g))
    a = runs.get("h100-a", {})
    hf_a, uns = res(a, "train_hf"), res(a, "train_unsloth")
    if hf_a and uns:
        rows.append(row("Unsloth 4-bit train samples/s (the default GPU backend)",
                        f"{hf_a['samples_per_s']} (transformers+peft bf16, batch 4, {hf_a['train_peak_gib']} GiB)",
                        f"{uns['samples_per_s']} (batch 16, {uns['train_peak_gib']} GiB)", a))
    h, now = runs.get("h100-q", {}), runs.get("h100-zf", {})
    plain, seven, lib = res(h, "infer_plain"), res(h, "infer_fast"), res(h, "infer_fast_generate")
    prof = res(h, "profile_infer")
    if plain and seven and res(now, "infer_fast"):
        rows.append(row("infer samples/s", f"{plain['samples_per_s']} (plain generate loop, batch 64; 3B, real lengths)",
                        f"{seven['samples_per_s']} ({seven['samples_per_s'] / plain['samples_per_s']:.2f}x; "
                        f"{lib['samples_per_s']} with the library's generate; goal 120: not met, the "
                        f"{prof.get('prefill_ms_median', 0):.0f} ms prefill per 64 rows alone caps it at "
                        f"~{64000 / prof.get('prefill_ms_median', 1):.0f}{ceiling_clause(runs)}. At commit "
                        f"{now['commit']}, h100-zf: {res(now, 'infer_plain')['samples_per_s']} -> "
                        f"{res(now, 'infer_fast')['samples_per_s']}{later_infer(runs)})", h))
    u = runs.get("h200x2-u", {})
    one, two = u.get("infer_fast") or {}, u.get("infer_fast_2gpu") or {}
    if one.get("result") and two.get("result"):
        e1, e2 = one["result"]["samples_per_s"], two["samples_per_s_all_ranks"]
        job1, job2 = one["result"]["total_s"], max(x["total_s"] for x in [two["result"], *two.get("other_ranks", [])])
        rows.append(row("infer 2-GPU scaling", f"{e1} samples/s (7_infer, 1 GPU, steady state)",
                        f"{e2} (torchrun, 2 GPUs: {e2 / e1:.2f}x, each rank from its first batch's end to its last; "
                        f"goal 1.9x: met. A whole 1,280-row job: {job1} -> {job2} s, {job1 / job2:.2f}x, as model "
                        f"loading and compiling are a fixed cost per job{later_infer_2gpu(runs)})", u,
                        " (H100s not given)"))
    d, s, z = runs.get("h200x2-zb", {}), runs.get("h200x2-za", {}), runs.get("h200x2-z", {})
    d1, d2 = res(d, "train_fast"), res(d, "train_fast_2gpu")
    t1, t2 = res(s, "train_fast"), res(s, "train_fast_2gpu")
    z1, z2, zs = res(z, "train_fast"), res(z, "train_fast_2gpu"), res(z, "train_fast_2gpu_stock")
    if d1 and d2 and t1 and t2 and z1 and z2 and zs:
        rows.append(row("train 2-GPU scaling", f"{d1['samples_per_s']} samples/s (6_train, 1 GPU, batch 16, 4 "
                        "micro-batches a step: the default)", f"{d2['samples_per_s']} (torchrun, 2 GPUs x 16 x 4: "
                        f"{ratio(d2, d1)}; goal 1.9x: met at the default accumulation. With an all-reduce after "
                        f"every micro-batch (`--grad-accum 1`, the worst case), the same code: {ratio(t2, t1)} "
                        f"(h200x2-za: {t1['samples_per_s']} -> {t2['samples_per_s']}) and {ratio(z2, z1)} "
                        f"(h200x2-z), against {ratio(zs, z1)} with DDP as PyTorch sets it up{later_train_2gpu(runs)})",
                        d, " (H100s not given)"))
    r, x = runs.get("h100-s", {}), runs.get("h100-zc", {})
    prof_i, prof_t = prof.get("plain") or {}, res(r, "profile_train").get("plain") or {}
    if hf and fast and x:
        rows.append(row("GPU busy (steady state)", f"nvidia-smi: train {busy(g, 'train_hf')} (infer not sampled)",
                        f"nvidia-smi: infer {busy(h, 'infer_fast')} (h100-q; {busy(now, 'infer_fast')} in h100-zf; "
                        f"goal 90%: met), train{current_busy(runs)} {busy(g, 'train_fast')} (goal 90%: not met in "
                        f"this run; the same code "
                        f"on other H100s: {busy(x, 'train_fast')} in h100-zc, {busy(x, 'train_fast_big')} there at "
                        f"batch 20, {busy(runs.get('h100-zg', {}), 'train_fast')} in h100-zg, {busy(acc, 'train_fast')} at the "
                        f"default accumulation of 4 in h100-ze; "
                        f"{busy(d, 'train_fast')} on an H200 at the default accumulation, h200x2-zb; at commit 73508e8 and later ones "
                        f"{later_busy(runs)}: the steps are "
                        f"partly launch-bound, so the figure follows the host). Training windows before commit 2f1d6b6 "
                        f"ran past the last step onto the closing save's idle GPU: 88.5% in h100-z is low for that "
                        f"reason; profiler (kernel time / wall): "
                        f"infer "
                        f"{prof_i.get('gpu_busy_pct', '-')}% over 2 batches, one re-capturing a decode graph, "
                        f"{(prof.get('with_stacks') or {}).get('gpu_busy_pct', '-')}% over the next; train "
                        f"{prof_t.get('gpu_busy_pct', '-')}% over 2 steps (h100-s, before the `model.train()` fix)", g))
    return rows


COMMANDS = """Commands (one device call each; wheels from `../shared/device/wheels.sh` in `.whl/`, `bench/assets/` = copies of
`../shared/qwen2.5-vl-processor` and `../shared/data/real_catalog_2k.csv`, both carried):

```
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# train samples/s and GPU busy (h100-zd; h100-z a session earlier, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 540 --phases build,data,train_hf,train_fast --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=260
# train 2-GPU scaling at commit 099a679, with the vision-index fix and the LoRA groups (h200x2-zd,
# nvidia-h100-x2, which gave 2 H200s)
python3 bench/gpu_bench.py --out $OUT --deadline 455 --phases build,data,train_fast,train_fast_2gpu --train-rows 384 --test-rows 64 --steps 15 --grad-accum 4 --limits build=60,data=100,train=150
# infer and train 2-GPU scaling at commit 862e53c (h200x2-zc, nvidia-h100-x2, which gave 2 H200s)
python3 bench/gpu_bench.py --out $OUT --deadline 560 --phases build,data,infer_fast,infer_fast_2gpu,train_fast,train_fast_2gpu --train-rows 384 --test-rows 1024 --steps 15 --grad-accum 4 --limits build=60,data=120,infer=90,train=130
# the float constants' paired step rate, A-B-A (h100-zy, nvidia-h100-x1, at commit f40ed98)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,train_fast,train_fast_dynamic_floats,train_fast_again --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=200
# the LoRA groups against peft's layers one by one, A-B-A (h100-zzb, nvidia-h100-x1, at commit 17cc438; h100-zza at
# fdb107f, before the groups were the default: phases train_fast,train_fast_lora_groups,train_fast_again)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,train_fast,train_fast_ungrouped,train_fast_again --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=200
# the collator's vision indices against the tower's own, A-B-A (h100-zz, nvidia-h100-x1, at commit fb70031)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,train_fast_device_indices,train_fast,train_fast_device_indices_again --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=200
# CUDA graphs' recording with the host's stacks sampled, before the cheaper alias checks (h100-zv, at commit c55ddf2,
# with the inference A/B of the float constants, constants first; h100-zu at fa96b9b the other order, its sampler
# then faulthandler's, which segfaulted the training phase; from commit 862e53c the constants are the default and
# the same A/B is phase infer_fast_dynamic_floats):
python3 bench/gpu_bench.py --out $OUT --deadline 570 --phases build,data,infer_fast_floats,infer_fast,train_fast_graphs --train-rows 384 --test-rows 640 --steps 40 --sample-stacks 0.1 --limits build=60,data=110,infer=100,train=215
python3 bench/stack_samples.py $OUT/train_fast_graphs.stacks.txt.gz --result /tmp/gpu_bench/train_fast_graphs.json --steps record
# ... and after them (h100-zx at commit f40ed98; h100-zw at 8aeb83d, where the sampler kept frames alive and the
# graphs phase failed on a tensor in their pool)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,train_fast_graphs,train_fast --train-rows 384 --test-rows 64 --steps 40 --sample-stacks 0.1 --limits build=60,data=100,train=215
# train 2-GPU scaling at 6_train.py's default accumulation of 4 (h200x2-zb, nvidia-h100-x2, which gave 2 H200s)
python3 bench/gpu_bench.py --out $OUT --deadline 555 --phases build,data,train_fast,train_fast_2gpu --train-rows 384 --test-rows 64 --steps 15 --grad-accum 4 --limits build=60,data=100,train=200
# train samples/s and GPU busy at the default accumulation of 4 (h100-ze, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 500 --phases build,data,train_hf,train_fast --train-rows 384 --test-rows 64 --steps 15 --grad-accum 4 --limits build=60,data=100,train=260
# GPU busy with the corrected window, the garbage-collection A/B and batch 20 (h100-zc, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 560 --phases build,data,train_fast,train_fast_autogc,train_fast_big --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=180
# GPU busy and a trace of two training steps (h100-zg, nvidia-h100-x1; profile_train timed out in its pass with
# stacks, after the plain trace was written: bench/trace_gaps.py train_trace.json.gz --window train_unit)
python3 bench/gpu_bench.py --out $OUT --deadline 540 --phases build,data,profile_train,train_fast --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=190,profile_train=150
# training attention with and without the padding mask (h100-zh, nvidia-h100-x1, at commit 562f673, when the
# mask was the default; from b96527e the same A/B is phases train_fast,train_fast_masked)
python3 bench/gpu_bench.py --out $OUT --deadline 540 --phases build,data,train_fast,train_fast_causal --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=190
# the prefill's floor, the vision MLP padding A/B in inference and the profiled prefill (h100-zj, nvidia-h100-x1;
# h100-zi ran the floor alone before the padding existed)
python3 bench/gpu_bench.py --out $OUT --deadline 540 --phases floor,build,data,infer_fast,infer_fast_unpadded,profile_infer --train-rows 128 --test-rows 1024 --limits floor=60,build=60,data=130,infer=110,profile_infer=90
# the vision MLP padding A/B in training, in both phase orders (h100-zk, then h100-zl with the two phases swapped)
python3 bench/gpu_bench.py --out $OUT --deadline 560 --phases build,data,train_fast,train_fast_unpadded --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=200
# Inductor's C++ wrapper A/B on one H100 (h100-zn: build,data,train_fast,train_fast_cpp, where the cold compile
# cut train_fast_cpp at 200 s; then h100-zo on the same warm machine, reusing its model and data:)
python3 bench/gpu_bench.py --out $OUT --deadline 560 --phases train_fast_cpp,train_fast --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=200
# CUDA graphs over every compiled block (h100-zp, nvidia-h100-x1, at commit 1585667: train_fast_graphs died)
python3 bench/gpu_bench.py --out $OUT --deadline 572 --phases build,data,train_fast_graphs,train_fast --train-rows 384 --test-rows 64 --steps 50 --limits build=60,data=100,train=225
# the same after the fix, in both phase orders (h100-zr at commit 8eb83eb; then h100-zs, a fresh H100, with
# --deadline 580 --phases build,data,train_fast,train_fast_graphs and train=235); each with PYTHONFAULTHANDLER=1,
# and GPU busy step by step added afterwards by python3 bench/step_busy.py LABEL OUT/gpu_util.csv
python3 bench/gpu_bench.py --out $OUT --deadline 560 --phases build,data,train_fast_graphs,train_fast --train-rows 384 --test-rows 64 --steps 50 --limits build=60,data=100,train=225
# the float attributes as constants against PyTorch's default (h100-zt, at commit e606628, when the constants were
# phase train_fast_floats; from the commit that made them the default, the same A/B is train_fast_dynamic_floats)
python3 bench/gpu_bench.py --out $OUT --deadline 520 --phases build,data,train_fast_floats,train_fast --train-rows 384 --test-rows 64 --steps 40 --limits build=60,data=100,train=200
# where it died (h100-zq: the small model's build and data by gpu_bench.py --size small --model-dir /tmp/qsmall
# --root /tmp/gbs --phases build,data --train-rows 48 --test-rows 16, then 6_train.py under a wrapper that calls
# faulthandler.dump_traceback_later(45, repeat=True) and runs 6_train.py with runpy:)
timeout -s INT 150 python3 WRAPPER.py --work-dir /tmp/gbs/work --model /tmp/qsmall --backend hf --batch-size 4 --max-steps 6 --grad-accum 1 --eval-steps 0 --eval-samples 8 --save-steps 1000 --workers 0 --no-load-in-4bit --cuda-graphs --output-dir /tmp/gbs/cg --overwrite
# the floor at two lengths, with fused projection groups (h100-zm, nvidia-h100-x1, the script alone)
for n in 615 601; do python3 bench/gpu_prefill_floor.py --prompt-tokens $n --result $OUT/floor_$n.json; done
# infer samples/s at a later commit (h100-zf, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 480 --phases build,data,infer_plain,infer_fast,infer_fast_generate --train-rows 128 --test-rows 1024 --limits build=60,data=130,train=200,infer=100,infer_plain=130
# train 2-GPU scaling, and one bucket (h200x2-za, nvidia-h100-x2, which gave 2 H200s)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,train_fast,train_fast_2gpu,train_fast_2gpu_bucket --train-rows 1024 --test-rows 64 --steps 40 --fast-extra "--workers 2" --limits build=60,data=130,train=200
# train 2-GPU scaling, DDP as PyTorch sets it up against ours (h200x2-z, nvidia-h100-x2, which gave 2 H200s)
python3 bench/gpu_bench.py --out $OUT --deadline 570 --phases build,data,train_fast,train_fast_2gpu_stock,train_fast_2gpu --train-rows 1024 --test-rows 64 --steps 40 --fast-extra "--workers 2" --limits build=60,data=130,train=200
# the 3B's garbage collections with the automatic collector on (h100-zb, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 330 --phases build,data,train_fast_autogc --train-rows 384 --test-rows 64 --steps 16 --limits build=60,data=100,train=200
# batch 20 against 16 on the H100 (h100-za, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 500 --phases build,data,train_fast,train_fast_big --train-rows 384 --test-rows 64 --steps 30 --fast-big-batch 20 --limits build=60,data=100,train=215
# train 2-GPU scaling, with and without the compiled-graph cut (h200x2-y, nvidia-h100-x2, which gave 2 H200s)
python3 bench/gpu_bench.py --out $OUT --deadline 570 --phases build,data,train_fast,train_fast_2gpu,train_fast_2gpu_split --train-rows 1024 --test-rows 64 --steps 40 --fast-extra "--workers 2" --limits build=60,data=130,train=200
# the same as h100-z with a profile, whose train limit of 180 s cut train_fast mid-run (h100-y, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,train_hf,train_fast,profile_train --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=180,profile_train=130
# train samples/s and GPU busy, the bench without per-step syncs (h100-x, nvidia-h100-x1; its profile_train was cut
# when the device time ran out; h100-s: the same before the model.train() fix, profile included)
python3 bench/gpu_bench.py --out $OUT --deadline 470 --phases build,data,train_hf,train_fast,profile_train --train-rows 384 --test-rows 64 --steps 30 --limits build=60,data=100,train=180,profile_train=125
# train 2-GPU scaling (h200x2-v, nvidia-h100-x2, which gave 2 H200s; h200x2-w: the same with NCCL_DEBUG=INFO
# NCCL_DEBUG_SUBSYS=INIT,P2P set and profile_train_2gpu added, which the deadline skipped)
python3 bench/gpu_bench.py --out $OUT --deadline 580 --phases build,data,train_fast,train_fast_2gpu --train-rows 1024 --test-rows 64 --steps 40 --fast-extra "--workers 2" --limits build=60,data=130,train=230
# infer samples/s and its profile (h100-q, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 580 --phases build,data,infer_plain,infer_fast,infer_fast_generate,profile_infer --train-rows 128 --test-rows 1280 --limits build=60,data=130,train=200,infer=110,infer_plain=150
# training speed and profile after the host-built ids (h100-r, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 560 --phases build,data,train_fast,profile_train --train-rows 384 --test-rows 64 --steps 20 --limits build=60,data=100,train=220
# infer 2-GPU scaling (h200x2-u, nvidia-h100-x2, which gave 2 H200s; h200x2-t: the same before the bench's steady-window fix)
python3 bench/gpu_bench.py --out $OUT --deadline 330 --phases build,data,infer_fast,infer_fast_2gpu --train-rows 128 --test-rows 1280 --limits build=60,data=130,infer=110
# train 2-GPU scaling, 1,024 rows, with the bench's per-step syncs (h200x2-s, nvidia-h100-x2, which gave 2 H200s)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,train_fast,train_fast_2gpu --train-rows 1024 --test-rows 64 --steps 20 --fast-extra "--workers 2" --limits build=60,data=130,train=230
# train samples/s with the bench's per-step syncs (h100-g, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,infer_plain,infer_fast,train_hf,train_fast,profile_infer --train-rows 384 --test-rows 768 --steps 20 --limits build=60,data=100,train=200,infer=100
# the infer profile before the host-built ids (h100-p, nvidia-h100-x1; h100-l added infer_fast_mlp)
python3 bench/gpu_bench.py --out $OUT --deadline 580 --phases build,data,infer_plain,infer_fast,infer_fast_generate,profile_infer --train-rows 128 --test-rows 1280 --limits build=60,data=130,train=200,infer=110,infer_plain=150
# infer 2-GPU scaling and a 2-rank training profile (h200x2-m, nvidia-h100-x2, which gave 2 H200s)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,infer_fast,infer_fast_2gpu,profile_train_2gpu --train-rows 256 --test-rows 1280 --steps 16 --limits build=60,data=140,train=200,infer=100
# the earlier infer profile, before the static-cache decoder (h100-h, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 560 --phases build,data,infer_plain,infer_fast,infer_fast_big,profile_infer --train-rows 128 --test-rows 1280 --limits build=60,data=130,train=200,infer=130
# train 2-GPU scaling (h200x2-i, nvidia-h100-x2, which gave 2 H200s)
python3 bench/gpu_bench.py --out $OUT --deadline 575 --phases build,data,infer_fast,infer_fast_2gpu,train_fast,train_fast_2gpu --train-rows 256 --test-rows 640 --steps 16 --limits build=60,data=110,train=200,infer=90
# a training profile and Unsloth after the fixes (h100-j, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 540 --phases build,data,profile_train,train_unsloth --train-rows 384 --test-rows 64 --steps 16 --limits build=60,data=100,train=200,train_unsloth=230
# the profile before the fixes (h100-f, nvidia-h100-x1)
python3 bench/gpu_bench.py --out $OUT --deadline 540 --phases build,data,profile_infer,profile_train --train-rows 384 --test-rows 768 --steps 14 --limits build=60,data=100,train=260,infer=120
# here, from what came back
python3 bench/perf_report.py --add LABEL:COMMIT:OUT/results.json --write
```"""


def write_headline(rows: list[tuple[str, str]]) -> None:
    text = RESULTS.read_text(encoding="utf-8")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| metric | baseline | ours | device | date |"))
    end = start + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    names = [m for m, _ in rows]
    kept = [line for line in lines[start + 2:end] if not any(line.startswith(f"| {m}") for m in names)]
    table = lines[start:start + 2] + [r for _, r in rows] + kept
    after = lines[end:]
    if "<!-- perf-commands -->" in text:
        after = re.sub(r"<!-- perf-commands -->.*?<!-- /perf-commands -->\n?", "", "\n".join(after), flags=re.S).split("\n")
    after = "\n".join(after).lstrip("\n").split("\n")  # rerunning must not pile up blank lines
    block = ["", "<!-- perf-commands -->", COMMANDS, "<!-- /perf-commands -->", ""]
    RESULTS.write_text("\n".join(lines[:start] + table + block + after).rstrip("\n") + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--add", action="append", default=[], metavar="LABEL:COMMIT:RESULTS_JSON")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    for spec in a.add:
        add(spec)
    runs = load()
    body = render(runs)
    if a.write:
        update_section(RESULTS, "perf", body)
        write_headline(headline(runs))
    print(body)


if __name__ == "__main__":
    main()
