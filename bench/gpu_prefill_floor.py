"""The fastest an inference prefill could be on this GPU: its matmuls and attention calls alone, each at its own
shape, timed back to back with nothing between them.

An inference batch of --rows rows at --prompt-tokens padded tokens (448 px images: 1,024 patches each) runs,
per Qwen2.5-VL-3B's config (bench/gpu_build_model.py): in the vision tower the patch embedding, 32 blocks of
qkv / proj / gate / up / down and the merger; in the language model 36 layers of q / k / v / o / gate / up / down
and the LM head on each row's last token. Each of these GEMMs is timed with cuBLAS in bf16 (biases where the
model has them), then in FP8 (e4m3, a scale per row and per column: torch._scaled_mm, the GEMM alone, without
quantizing its input or adding a bias, K and N padded to multiples of 16: what an FP8 prefill's matmuls could not
go below). The vision MLP is timed as 7_infer.py runs it (width zero-padded to 3,456) and as the model has it
(3,420); the projections that share an input (q/k/v, gate/up) also as one GEMM per group, to see whether
fusing them would lower the floor. Attention: SDPA as
the pipeline calls it (cuDNN off): causal with grouped key/value heads in the language model, 64-patch windows
and four full-attention blocks in the tower.

Everything else a prefill does (norms, rotary, activations, residual adds, copies) is left out, so the sum is a
floor, and rows / (floor + the decode's measured time) a ceiling on samples/s. CUDA events, median of --reps.

    python bench/gpu_prefill_floor.py --result floor.json --decode-ms 76     # h100-q's 9 graphed decode steps
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_build_model import config  # noqa: E402


def gemm_shapes(rows: int, prompt_tokens: int, image_px: int = 448, vision_mlp_multiple: int = 128) -> list[dict]:
    """(part, M, K, N, bias, calls per batch) of every linear layer in a prefill, the vision MLP's width padded to
    a multiple of vision_mlp_multiple as 7_infer.py pads it (common.model.loading.pad_vision_mlp; 1: as the model
    has it)."""
    cfg = config("3b")
    t, v = cfg.text_config, cfg.vision_config
    tokens = rows * prompt_tokens
    patches = rows * (image_px // v.patch_size) ** 2
    merged = patches // v.spatial_merge_size ** 2
    kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    d, ff, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    vd, vL = v.hidden_size, v.depth
    vff = -(-v.intermediate_size // vision_mlp_multiple) * vision_mlp_multiple
    mm = vd * v.spatial_merge_size ** 2
    rows_of = [
        ("vision patch embed", patches, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, vd, False, 1),
        ("vision qkv", patches, vd, 3 * vd, True, vL), ("vision proj", patches, vd, vd, True, vL),
        ("vision gate+up", patches, vd, vff, True, 2 * vL), ("vision down", patches, vff, vd, True, vL),
        ("vision merger 1", merged, mm, mm, True, 1), ("vision merger 2", merged, mm, v.out_hidden_size, True, 1),
        ("LM q, o", tokens, d, d, True, 2 * L), ("LM k, v", tokens, d, kv, True, 2 * L),
        ("LM gate+up", tokens, d, ff, False, 2 * L), ("LM down", tokens, ff, d, False, L),
        ("LM head (last token)", rows, d, t.vocab_size, False, 1),
    ]
    return [dict(part=p, M=m, K=k, N=n, bias=b, calls=c) for p, m, k, n, b, c in rows_of]


def fused_shapes(rows: int, prompt_tokens: int, image_px: int = 448) -> dict[str, dict]:
    """The projections that share an input, each group as one GEMM (not how the model runs them): would the floor
    be lower that way? Keyed by the parts of gemm_shapes they replace."""
    by_part = {g["part"]: g for g in gemm_shapes(rows, prompt_tokens, image_px)}
    q, kv = by_part["LM q, o"], by_part["LM k, v"]
    lm_mlp, vision_mlp = by_part["LM gate+up"], by_part["vision gate+up"]
    layers = q["calls"] // 2
    return {
        "LM q, k, v as one": dict(q, part="LM q, k, v as one", N=q["N"] + 2 * kv["N"], calls=layers,
                                  replaces={"LM q, o": layers, "LM k, v": 2 * layers}),
        "LM gate+up as one": dict(lm_mlp, part="LM gate+up as one", N=2 * lm_mlp["N"], calls=layers,
                                  replaces={"LM gate+up": 2 * layers}),
        "vision gate+up as one": dict(vision_mlp, part="vision gate+up as one", N=2 * vision_mlp["N"],
                                      calls=vision_mlp["calls"] // 2, replaces={"vision gate+up": vision_mlp["calls"]}),
    }


def attention_shapes(rows: int, prompt_tokens: int, image_px: int = 448) -> list[dict]:
    cfg = config("3b")
    t, v = cfg.text_config, cfg.vision_config
    side = image_px // v.patch_size
    per_window = (v.window_size // v.patch_size) ** 2
    full = len(v.fullatt_block_indexes)
    return [
        dict(part="LM attention (causal, grouped kv)", B=rows, Hq=t.num_attention_heads, Hkv=t.num_key_value_heads,
             L=prompt_tokens, D=t.hidden_size // t.num_attention_heads, causal=True, calls=t.num_hidden_layers),
        dict(part="vision window attention", B=rows * side * side // per_window, Hq=v.num_heads, Hkv=v.num_heads,
             L=per_window, D=v.hidden_size // v.num_heads, causal=False, calls=v.depth - full),
        dict(part="vision full attention", B=rows, Hq=v.num_heads, Hkv=v.num_heads, L=side * side,
             D=v.hidden_size // v.num_heads, causal=False, calls=full),
    ]


def median_ms(fn, reps: int) -> float:
    import torch
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_gemm(s: dict, reps: int) -> dict:
    import torch
    import torch.nn.functional as F
    x = torch.randn(s["M"], s["K"], device="cuda", dtype=torch.bfloat16)
    w = torch.randn(s["N"], s["K"], device="cuda", dtype=torch.bfloat16) / s["K"] ** 0.5
    b = torch.randn(s["N"], device="cuda", dtype=torch.bfloat16) if s["bias"] else None
    flop = 2 * s["M"] * s["K"] * s["N"]
    out = dict(s, bf16_ms=median_ms(lambda: F.linear(x, w, b), reps))
    try:
        fp8 = torch.float8_e4m3fn
        k16, n16 = -(-s["K"] // 16) * 16, -(-s["N"] // 16) * 16  # FP8 GEMMs need both a multiple of 16
        x8 = F.pad(x, (0, k16 - s["K"])).to(fp8)
        w8 = F.pad(w, (0, k16 - s["K"], 0, n16 - s["N"])).to(fp8)
        sx = torch.ones(s["M"], 1, device="cuda", dtype=torch.float32)
        sw = torch.ones(1, n16, device="cuda", dtype=torch.float32)
        out["fp8_ms"] = median_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw,
                                                           out_dtype=torch.bfloat16), reps)
    except (RuntimeError, AttributeError) as err:  # no FP8 on this GPU / build: recorded, the bf16 floor stands
        out["fp8_error"] = str(err).splitlines()[0][:200]
    out["bf16_tflops"] = round(flop / out["bf16_ms"] / 1e9, 1)
    if "fp8_ms" in out:
        out["fp8_tflops"] = round(flop / out["fp8_ms"] / 1e9, 1)
    return out


def time_attention(s: dict, reps: int) -> dict:
    import torch
    import torch.nn.functional as F
    q = torch.randn(s["B"], s["Hq"], s["L"], s["D"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn(s["B"], s["Hkv"], s["L"], s["D"], device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    gqa = s["Hq"] != s["Hkv"]
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=s["causal"], enable_gqa=gqa), reps)
    flop = 4 * s["B"] * s["Hq"] * s["L"] ** 2 * s["D"] // (2 if s["causal"] else 1)
    return dict(s, bf16_ms=ms, bf16_tflops=round(flop / ms / 1e9, 1))


def summarise(gemms: list[dict], attention: list[dict], rows: int, decode_ms: float,
              unpadded: list[dict] | None = None, fused: list[dict] | None = None) -> dict:
    def total(items, key):
        return sum(x[key] * x["calls"] for x in items if key in x)
    attn = total(attention, "bf16_ms")
    out = {"gemm_bf16_ms": round(total(gemms, "bf16_ms"), 1), "attention_ms": round(attn, 1),
           "decode_ms": decode_ms,
           "gemm_tflop": round(sum(2 * g["M"] * g["K"] * g["N"] * g["calls"] for g in gemms) / 1e12, 1)}
    out["floor_bf16_ms"] = round(out["gemm_bf16_ms"] + attn, 1)
    out["ceiling_bf16_samples_per_s"] = round(rows / ((out["floor_bf16_ms"] + decode_ms) / 1000), 1)
    if all("fp8_ms" in g for g in gemms):
        out["gemm_fp8_ms"] = round(total(gemms, "fp8_ms"), 1)
        out["floor_fp8_ms"] = round(out["gemm_fp8_ms"] + attn, 1)
        out["ceiling_fp8_samples_per_s"] = round(rows / ((out["floor_fp8_ms"] + decode_ms) / 1000), 1)
    if unpadded:  # the same prefill with the vision MLP as the model has it
        swapped = {g["part"] for g in unpadded}
        out["gemm_bf16_ms_unpadded"] = round(total([g for g in gemms if g["part"] not in swapped] + unpadded,
                                                   "bf16_ms"), 1)
        out["vision_mlp_bf16_ms"] = round(total([g for g in gemms if g["part"] in swapped], "bf16_ms"), 1)
        out["vision_mlp_bf16_ms_unpadded"] = round(total(unpadded, "bf16_ms"), 1)
    if fused:  # shared-input projections as one GEMM each: what that would save
        per_call = {g["part"]: g["bf16_ms"] for g in gemms}
        saved = sum(sum(per_call[part] * n for part, n in f["replaces"].items()) - f["bf16_ms"] * f["calls"]
                    for f in fused)
        out["fused_projections_saving_ms"] = round(saved, 1)
        out["ceiling_bf16_fused_samples_per_s"] = round(rows / ((out["floor_bf16_ms"] - saved + decode_ms) / 1000), 1)
    return out


def table_row(g: dict) -> str:
    """One timed GEMM or attention call as a markdown table row (this script's table and bench/RESULTS.md's)."""
    shape = f"{g['M']} x {g['K']} x {g['N']}" if "M" in g else f"{g['B']} x {g['Hq']} x {g['L']} x {g['D']}"
    fp8 = f"{g['fp8_ms']:.3f} | {g['fp8_tflops']}" if "fp8_ms" in g else "- | -"
    return f"| {g['part']} | {shape} | {g['calls']} | {g['bf16_ms']:.3f} | {g['bf16_tflops']} | {fp8} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=615, help="mean padded prompt length (h100-q's batches)")
    ap.add_argument("--decode-ms", type=float, default=76.0, help="measured decode time per batch (h100-q)")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("gpu_prefill_floor.py times CUDA kernels: run it on the GPU machine")
    torch.backends.cuda.enable_cudnn_sdp(False)  # as common.model.loading.use_cudnn_attention(False)
    started = time.time()
    gemms = [time_gemm(s, a.reps) for s in gemm_shapes(a.rows, a.prompt_tokens)]
    unpadded = [time_gemm(s, a.reps) for s in gemm_shapes(a.rows, a.prompt_tokens, vision_mlp_multiple=1)
                if s["part"] in ("vision gate+up", "vision down")]
    fused = [time_gemm(s, a.reps) for s in fused_shapes(a.rows, a.prompt_tokens).values()]
    attention = [time_attention(s, a.reps) for s in attention_shapes(a.rows, a.prompt_tokens)]
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "rows": a.rows, "prompt_tokens": a.prompt_tokens, "torch": torch.__version__,
              "gemms": gemms, "attention": attention, "vision_mlp_unpadded": unpadded, "fused": fused,
              "summary": summarise(gemms, attention, a.rows, a.decode_ms, unpadded, fused),
              "seconds": round(time.time() - started, 1)}
    a.result.parent.mkdir(parents=True, exist_ok=True)
    a.result.write_text(json.dumps(result, indent=1))
    print(f"{result['device']}: batch of {a.rows} x {a.prompt_tokens} tokens")
    print("| part | M x K x N (attention: B x heads x L x head dim) | calls | bf16 ms a call | bf16 TFLOP/s | "
          "FP8 ms a call | FP8 TFLOP/s |")
    for g in gemms + [dict(u, part=u["part"] + " (unpadded)") for u in unpadded] + fused + attention:
        print(table_row(g))
    print("SUMMARY floor", json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
