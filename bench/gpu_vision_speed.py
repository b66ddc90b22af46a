"""Where a forward's time goes, and what bucketed vision attention and compiled vision blocks change: the
vision tower alone and the whole prefill (vision + language model), per-window `sdpa`, then
`common.speed.vision_attention`, then that plus torch.compile of each vision block, same inputs.

    python bench/gpu_vision_speed.py --model /tmp/qwen25vl3b-random --result R.json [--images 64]

Inputs: N 448 px images (1024 patches, 256 image tokens each, random pixels) and the issue's fixed shape
of 608 tokens per sample (350 text + 256 image + 2). Median of --repeats timed calls after 2 warm-up
calls, GPU synchronized. Also reported: the largest difference of the tower's output between the two
attention paths (bf16), and whether greedy 8-token generations agree, for the same 16 samples.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGE_TOKEN, START, END = 151655, 151652, 151653


def timed(fn, repeats: int) -> float:
    import torch
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(n: int, device) -> dict:
    import torch
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1000, 100000, (n, 350), generator=g)
    ids = torch.cat([text[:, :10], torch.full((n, 1), START), torch.full((n, 256), IMAGE_TOKEN),
                     torch.full((n, 1), END), text[:, 10:]], dim=1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "mm_token_type_ids": (ids == IMAGE_TOKEN).int().to(device),
            "pixel_values": torch.randn(n * 1024, 1176, generator=g).to(device, torch.bfloat16),
            "image_grid_thw": torch.tensor([[1, 32, 32]] * n).to(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from common.speed.vision_attention import use_bucketed_vision_attention
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(a.model, dtype=torch.bfloat16).to("cuda").eval()
    tower = model.model.visual
    batch = inputs(a.images, "cuda")
    small = {k: (v[:16 * 1024] if k == "pixel_values" else v[:16]) for k, v in batch.items()}
    r = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "images": a.images,
         "tokens_per_sample": int(batch["input_ids"].shape[1])}

    def run_all(tag: str) -> None:
        with torch.no_grad():
            r[f"tower_s_{tag}"] = timed(lambda: tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"]),
                                        a.repeats)
            r[f"prefill_s_{tag}"] = timed(lambda: model(**batch, logits_to_keep=1), a.repeats)
            r[f"tower_out_{tag}"] = tower(small["pixel_values"], grid_thw=small["image_grid_thw"]).pooler_output
            r[f"tokens_{tag}"] = model.generate(**small, max_new_tokens=8, do_sample=False)[:, -8:].cpu()

    tower.config._attn_implementation = "sdpa"
    run_all("sdpa")
    use_bucketed_vision_attention(model)
    run_all("bucketed")
    from common.model.loading import compile_blocks
    t0 = time.perf_counter()
    compile_blocks(model, "vision", "hf")
    run_all("compiled")
    r["compiled_variant_total_s"] = round(time.perf_counter() - t0, 1)
    dc = (r.pop("tower_out_compiled").float() - r["tower_out_bucketed"].float()).abs()
    r["compiled_tower_max_abs_diff"] = round(dc.max().item(), 5)
    r["compiled_generate_rows_equal_bucketed"] = int((r.pop("tokens_compiled") == r["tokens_bucketed"]).all(1).sum())
    diff = (r.pop("tower_out_sdpa").float() - r.pop("tower_out_bucketed").float()).abs()
    ta, tb = r.pop("tokens_sdpa"), r.pop("tokens_bucketed")
    r.update({"tower_max_abs_diff": round(diff.max().item(), 5), "tower_mean_abs_diff": round(diff.mean().item(), 6),
              "generate_rows_equal": int((ta == tb).all(1).sum()), "generate_rows": int(ta.shape[0])})
    for tag in ("sdpa", "bucketed", "compiled"):
        r[f"tower_ms_per_image_{tag}"] = round(1000 * r[f"tower_s_{tag}"] / a.images, 2)
        r[f"prefill_samples_per_s_{tag}"] = round(a.images / r[f"prefill_s_{tag}"], 1)
        r[f"tower_share_of_prefill_{tag}"] = round(r[f"tower_s_{tag}"] / r[f"prefill_s_{tag}"], 3)
    r["tower_speedup"] = round(r["tower_s_sdpa"] / r["tower_s_bucketed"], 2)
    r["tower_speedup_compiled"] = round(r["tower_s_sdpa"] / r["tower_s_compiled"], 2)
    r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    a.result.write_text(json.dumps(r, indent=1, default=str))
    print("RESULT", json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
