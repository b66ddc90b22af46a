"""Build Qwen2.5-VL-3B's architecture with random weights (no hub), save it in bf16 beside the real tokenizer.

Speed does not depend on weight values, so this stands in for Qwen/Qwen2.5-VL-3B-Instruct on machines
without the hub. The folder gets the model (bf16 safetensors), the real Qwen2.5 tokenizer, chat template and
preprocessor_config.json copied from --processor (bench/assets/qwen-processor: a copy of the real processor
folder, gitignored), so that 4_preprocess.py, 6_train.py and 7_infer.py can use it as --model.

    python bench/gpu_build_model.py --out /tmp/qwen25vl3b-random            # the 3B shape, on the GPU
    python bench/gpu_build_model.py --out /tmp/qwen-small --size small      # same vocabulary, tiny layers (CPU tests)
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

# Qwen2.5-VL-3B-Instruct's config.json, with the token ids of the real tokenizer.
TOKENS = {"bos": 151643, "pad": 151643, "eos": 151645, "image": 151655, "video": 151656,
          "vision_start": 151652, "vision_end": 151653}
SIZES = {
    "3b": {"text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2),
           "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                          fullatt_block_indexes=[7, 15, 23, 31])},
    # CPU checks of the scripts: the real vocabulary and token ids, a few narrow layers (mrope sections sum to
    # head_dim / 2 = 16).
    "small": {"text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2),
              "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                             fullatt_block_indexes=[1])},
}
MROPE = {"3b": [16, 24, 24], "small": [4, 6, 6]}
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json")


def config(size: str):
    from transformers import Qwen2_5_VLConfig
    s = SIZES[size]
    text = dict(vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE[size]},
                bos_token_id=TOKENS["bos"], eos_token_id=TOKENS["eos"], pad_token_id=TOKENS["pad"],
                tie_word_embeddings=True, use_sliding_window=False, **s["text"])
    vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3,
                  hidden_act="silu", tokens_per_second=2, **s["vision"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=TOKENS["image"],
                            video_token_id=TOKENS["video"], vision_start_token_id=TOKENS["vision_start"],
                            vision_end_token_id=TOKENS["vision_end"], tie_word_embeddings=True)


def build(out: Path, size: str, processor: Path, seed: int = 0) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config(size), dtype=torch.bfloat16)
    model.generation_config.pad_token_id = TOKENS["pad"]
    model.generation_config.eos_token_id = TOKENS["eos"]
    model.generation_config.do_sample = False
    params = sum(p.numel() for p in model.parameters())
    built = time.time() - started
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in PROCESSOR_FILES:
        shutil.copy(processor / name, tmp / name)
    info = {"size": size, "params": params, "dtype": "bfloat16", "device": device, "seed": seed,
            "build_s": round(built, 1), "total_s": round(time.time() - started, 1)}
    (tmp / "random_model.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="3b")
    ap.add_argument("--processor", type=Path, default=Path(__file__).parent / "assets" / "qwen-processor")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(build(args.out, args.size, args.processor, args.seed)))


if __name__ == "__main__":
    main()
