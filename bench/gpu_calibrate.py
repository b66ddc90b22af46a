"""Peak memory and step time of a training step by micro-batch and gradient checkpointing, and of an inference
prefill by batch: what common/model/plan.py's memory and time coefficients are fitted to.

One process, one model (hf backend, 16-bit, LoRA r16, the speed levers on, as stage 6 runs it), real samples from
a stage 5 work folder; each configuration runs 2 warm-up steps and --steps timed ones (forward, backward, AdamW).

    python bench/gpu_calibrate.py --model /tmp/qwen25vl3b --work /tmp/bench/work --out calibrate.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.data.encode import ImageSpec, load_tokenizer  # noqa: E402
from common.data.shards import ShardStream  # noqa: E402
from common.model.collate import for_tokenizer  # noqa: E402
from common.model.loading import LoraSettings, load_training_model  # noqa: E402
from common.model.plan import ModelSize, Plan  # noqa: E402
from common.model.predict import with_normalized_pixels  # noqa: E402
from common.speed.answer_logits import answer_only_loss, answer_positions  # noqa: E402

TRAIN = [(0, 16), (0, 8), (0, 4), (0, 2), (1, 16), (1, 8), (2, 16), (4, 16), (2, 8)]  # (checkpoint every, micro)
CUDA = torch.cuda.is_available()  # without a GPU the script runs its logic on the CPU (a check, no figures)


def on_device(batch: dict) -> dict:
    return {k: v.cuda(non_blocking=True) if CUDA and isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(step, steps: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of `steps` calls after two warm-ups."""
    for _ in range(2):
        step()
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", type=Path, required=True, help="a work folder with webdataset_train/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--limit-s", type=float, default=240, help="stop starting new configurations after this")
    args = ap.parse_args()
    started = time.time()
    spec, tok = ImageSpec.from_model(args.model), load_tokenizer(args.model)
    samples = list(itertools.islice(iter(ShardStream(args.work / "webdataset_train", spec, normalize=False)), 64))
    plan = Plan("GPU", "hf", "16bit", "bfloat16" if CUDA else "float32", 16, 1, 1, CUDA, None, None)
    model, host = load_training_model(args.model, plan, LoraSettings(), seed=0)
    model.to("cuda" if CUDA else "cpu").train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=CUDA)
    collate = for_tokenizer(tok, host_ids=host)
    result = {"device": torch.cuda.get_device_name() if CUDA else "CPU", "size": ModelSize.of(args.model).__dict__,
              "tokens_mean": statistics.mean(len(s["input_ids"]) for s in samples), "train": [], "infer": []}

    for every, micro in TRAIN:
        if time.time() - started > args.limit_s:
            break
        if every:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                                every_n_layers=every)
        else:
            model.gradient_checkpointing_disable()
        batch = on_device(collate(samples[:micro]))
        tokens = batch["input_ids"].numel()

        def step():
            inputs = with_normalized_pixels(batch, spec)
            labels = inputs["labels"]
            positions = answer_positions(labels)
            out = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=positions, use_cache=False)
            answer_only_loss(out.logits, labels, positions).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        try:
            seconds, peak = timed(step, args.steps)
            result["train"].append({"every": every, "micro": micro, "tokens": tokens, "step_s": round(seconds, 4),
                                    "peak_gib": round(peak, 2), "samples_per_s": round(micro / seconds, 2)})
        except torch.OutOfMemoryError:
            result["train"].append({"every": every, "micro": micro, "tokens": tokens, "oom": True})
            torch.cuda.empty_cache()
        print(json.dumps(result["train"][-1]), flush=True)
        args.out.write_text(json.dumps(result, indent=1))

    model.eval()
    generation = for_tokenizer(tok, "left", with_labels=False, host_ids=host)
    for size in (64, 32):
        batch = on_device(generation(samples[:size]))
        with torch.no_grad():
            seconds, peak = timed(lambda: model(**with_normalized_pixels(batch, spec), logits_to_keep=1,
                                                use_cache=True), args.steps)
        result["infer"].append({"batch": size, "tokens": batch["input_ids"].numel(), "prefill_s": round(seconds, 4),
                                "peak_gib": round(peak, 2)})
        print(json.dumps(result["infer"][-1]), flush=True)
    result["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
