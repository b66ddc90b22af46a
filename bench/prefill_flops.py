"""What an inference batch's prefill costs in matmul FLOPs, and the rate 120 samples/s would need.

Counted from Qwen2.5-VL-3B's shapes (bench/gpu_build_model.py's config): 2 FLOPs per multiply-add of every
linear layer, attention's two products (causal prompts at half), per padded prompt token in the language model
and per 14 px patch in the vision tower (windows of 64 patches, 4 full-attention blocks), the LM head on each
row's last token only. Elementwise work (norms, rotary, activations) is left out: it costs memory traffic, not
FLOPs. CPU only:

    python bench/prefill_flops.py --prompt-tokens 615 --prefill-ms 686 --decode-ms 76   # h100-q's figures
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_build_model import config  # noqa: E402


def prefill_flops(rows: int, prompt_tokens: int, image_px: int = 448) -> dict:
    cfg = config("3b")
    t, v = cfg.text_config, cfg.vision_config
    kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    lm_linear = t.num_hidden_layers * (2 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * kv
                                       + 3 * t.hidden_size * t.intermediate_size)
    lm = 2 * lm_linear * prompt_tokens * rows
    lm_attention = t.num_hidden_layers * 2 * prompt_tokens ** 2 * t.hidden_size * rows  # 4 L^2 d, causal: half
    patches = (image_px // v.patch_size) ** 2
    window = (v.window_size // v.patch_size) ** 2
    block = 4 * v.hidden_size ** 2 + 3 * v.hidden_size * v.intermediate_size
    merged = v.hidden_size * v.spatial_merge_size ** 2
    vision = rows * (2 * patches * (v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * v.hidden_size
                                    + v.depth * block)
                     + 2 * patches // v.spatial_merge_size ** 2 * (merged * merged + merged * v.out_hidden_size))
    full = len(v.fullatt_block_indexes)
    vision_attention = rows * 4 * v.hidden_size * ((v.depth - full) * patches * window + full * patches ** 2)
    head = 2 * t.hidden_size * t.vocab_size * rows
    parts = {"language model linear": lm, "language model attention": lm_attention, "vision tower linear": vision,
             "vision tower attention": vision_attention, "LM head (last token)": head}
    return {k: x / 1e12 for k, x in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=615, help="mean padded prompt length of the batches")
    ap.add_argument("--prefill-ms", type=float, default=686.0, help="measured prefill per batch")
    ap.add_argument("--decode-ms", type=float, default=76.0, help="measured decode steps per batch")
    ap.add_argument("--target", type=float, default=120.0, help="samples/s wanted")
    a = ap.parse_args()
    parts = prefill_flops(a.rows, a.prompt_tokens)
    total = sum(parts.values())
    print(f"| prefill of {a.rows} rows x {a.prompt_tokens} tokens, 448 px images | TFLOP |\n|---|---:|")
    for k, x in parts.items():
        print(f"| {k} | {x:.1f} |")
    print(f"| total | {total:.1f} |\n")
    budget_s = a.rows / a.target - a.decode_ms / 1000
    print(f"measured: {a.prefill_ms:.0f} ms -> {total / (a.prefill_ms / 1000):.0f} TFLOP/s; "
          f"{a.target:.0f} samples/s leaves {budget_s * 1000:.0f} ms for the prefill after {a.decode_ms:.0f} ms of "
          f"decoding -> {total / budget_s:.0f} TFLOP/s needed (H100 SXM dense bf16 peak: 989)")


if __name__ == "__main__":
    main()
