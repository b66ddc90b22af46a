"""Inference speed: stage 7 as it is against a plain transformers `model.generate` loop, same rows, batch 64.

Two kinds of run, one process each:

    # stage 7 (7_infer.py's main(): shard reader, length-sorted left-padded batches, number-constrained greedy
    # decoding, part files); every predict_batch call is timed with the GPU synchronized
    python bench/gpu_infer_speed.py seven --result R.json -- --work-dir W --data-dir D --train-dir T --batch-size 64

    # what a user writes: AutoProcessor + Qwen2_5_VLForConditionalGeneration (bf16, sdpa) + the LoRA adapter
    # merged, chat template, PIL images, processor(..., padding=True), model.generate(max_new_tokens=10)
    python bench/gpu_infer_speed.py plain --result R.json --model M --adapter A --jsonl W/jsonl/test.jsonl

Both take rows in batches of 64 and leave the first batch (CUDA warm-up) out of the throughput:
`samples_per_s` = samples after the first batch / wall time from the first batch's end to the last one's
(data preparation and decoding included; under torchrun the closing barrier is not, see run_seven),
`generate_samples_per_s` counts only the generate calls. Predictions (sample_id ->
parsed price or None) are saved in the result for comparison.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_results import load_stage  # noqa: E402


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(result: dict, batches: list[dict], wall_after_first: float | None) -> None:
    import torch
    rest = batches[1:]
    n_rest = sum(b["n"] for b in rest)
    gen = [b["generate_s"] for b in rest]
    result.update({
        "batches": len(batches), "samples": sum(b["n"] for b in batches),
        "first_batch_s": round(batches[0]["generate_s"], 2) if batches else None,
        "median_generate_s": round(statistics.median(gen), 3) if gen else None,
        "generate_samples_per_s": round(n_rest / sum(gen), 2) if gen else None,
        "samples_per_s": round(n_rest / wall_after_first, 2) if rest and wall_after_first else None,
        "prompt_tokens_mean": round(statistics.mean(b["prompt_len"] for b in batches), 1) if batches else None,
        "batch_log": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in b.items()} for b in batches],
    })
    if torch.cuda.is_available():
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def run_seven(args, argv: list[str]) -> dict:
    if "--backend" in argv and argv[argv.index("--backend") + 1] == "unsloth":
        import unsloth  # noqa: F401
    stage7 = load_stage("7_infer.py")
    import common.model.inference as ci
    from common import options
    cfg = options.parse(stage7.InferOptions, argv)
    shutil.rmtree(cfg.work_dir / f"infer_{cfg.split}", ignore_errors=True)  # no resuming between runs
    batches, marks, texts, collated_ids = [], {}, {}, collections.deque()
    inner = ci.predict_batch
    import common.model.collate as cc
    collate = cc.Collator.__call__

    def recording_collate(self, samples):  # run_predictions collates batches in order, one ahead of predict_batch
        collated_ids.append([s["sample_id"] for s in samples])
        return collate(self, samples)

    cc.Collator.__call__ = recording_collate

    def timed_predict(model, tokenizer, batch, **kw):
        decoded = []
        decode = tokenizer.batch_decode
        tokenizer.batch_decode = lambda *a, **kw: decoded.extend(decode(*a, **kw)) or decoded
        sync()
        t0 = time.perf_counter()
        try:
            out = inner(model, tokenizer, batch, **kw)
        finally:
            del tokenizer.batch_decode
        sync()
        t1 = time.perf_counter()
        texts.update(zip(collated_ids.popleft(), decoded))
        if not batches:
            marks["first_end"] = t1
            marks["first_end_epoch"] = time.time()
        marks["last_end"], marks["last_end_epoch"] = t1, time.time()
        batches.append({"n": len(out), "prompt_len": int(batch["input_ids"].shape[1]), "generate_s": t1 - t0})
        return out

    ci.predict_batch = timed_predict
    started = time.perf_counter()
    stats = stage7.main(cfg)
    sync()
    ended = time.perf_counter()
    result = {"kind": "seven", "argv": argv, "backend": stats.get("backend"), "total_s": round(ended - started, 1),
              "steady_start_epoch": marks.get("first_end_epoch"), "steady_end_epoch": marks.get("last_end_epoch"),
              "rank": int(os.environ.get("RANK", 0)), "world_size": int(os.environ.get("WORLD_SIZE", 1)),
              "run": stats.get("rank0_run"), "fallbacks": stats.get("fallback_counts")}
    # the steady rate ends at this rank's last batch: the wait for slower ranks at the closing barrier (their
    # first batch compiles for longer) and rank 0's merge are a fixed cost per job, in total_s
    summarize(result, batches, marks["last_end"] - marks["first_end"] if "first_end" in marks else None)
    preds = ci.read_parts(cfg.work_dir / f"infer_{cfg.split}" / "parts")
    result["predictions"] = {sid: p for sid, (p, _status) in preds.items()}
    result["texts"] = texts
    return result


def image_path(row: dict) -> str | None:
    for msg in row["messages"]:
        for part in msg["content"]:
            if part.get("type") == "image":
                return part["image"]
    return None


def load_processor(model_dir: str):
    """AutoProcessor, as a user would; where torchvision is missing (the CPU machines) an image-only one."""
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(model_dir), "AutoProcessor"
    except Exception as err:  # noqa: BLE001  - the CPU machines: no torchvision, no video processor
        from transformers import AutoTokenizer, Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
        chat = json.loads((Path(model_dir) / "chat_template.json").read_text())["chat_template"]

        class ImageOnlyProcessor(Qwen2_5_VLProcessor):
            attributes = ["image_processor", "tokenizer"]

            def __init__(self, image_processor, tokenizer, chat_template=None):
                from transformers.processing_utils import ProcessorMixin
                self.image_token = "<|image_pad|>"
                self.video_token = "<|video_pad|>"
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
                ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        proc = ImageOnlyProcessor(Qwen2VLImageProcessorPil.from_pretrained(model_dir),
                                  AutoTokenizer.from_pretrained(model_dir), chat_template=chat)
        return proc, f"image-only processor (AutoProcessor failed: {type(err).__name__})"


def run_plain(args) -> dict:
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration
    sys.path.insert(0, str(ROOT))
    from common.prompt import parse_price
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    rows = [json.loads(line) for line in open(args.jsonl, encoding="utf-8")][: args.limit or None]
    processor, how = load_processor(args.model)
    processor.tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device)
    if args.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.eval()
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    load_s = time.perf_counter() - started
    batches, preds, texts_out = [], {}, {}
    first_end = None
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i:i + args.batch_size]
        t0 = time.perf_counter()
        texts = [processor.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
                 for r in chunk]
        images = [Image.open(image_path(r)).convert("RGB") for r in chunk]
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(device)
        sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=eos)
        sync()
        t2 = time.perf_counter()
        decoded = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for r, text in zip(chunk, decoded):
            preds[r["sample_id"]] = parse_price(text)
            texts_out[r["sample_id"]] = text
        t3 = time.perf_counter()
        if first_end is None:
            first_end = t3
        batches.append({"n": len(chunk), "prompt_len": int(inputs["input_ids"].shape[1]), "prepare_s": t1 - t0,
                        "generate_s": t2 - t1, "decode_s": t3 - t2})
    ended = time.perf_counter()
    result = {"kind": "plain", "processor": how, "model": args.model, "adapter": args.adapter,
              "model_load_s": round(load_s, 1), "total_s": round(ended - started, 1),
              "keys": sorted(inputs.keys())}
    summarize(result, batches, ended - first_end)
    prep = [b["prepare_s"] for b in batches[1:]]
    result["median_prepare_s"] = round(statistics.median(prep), 3) if prep else None
    result["predictions"] = preds
    result["texts"] = texts_out
    return result


def main() -> None:
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["seven", "plain"])
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--name", default="")
    ap.add_argument("--model", help="plain: base model folder")
    ap.add_argument("--adapter", default="", help="plain: LoRA adapter folder (merged), or empty for none")
    ap.add_argument("--jsonl", help="plain: the chat JSONL of the rows (stage 3's test.jsonl)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args(sys.argv[1:cut])
    import torch
    meta = {"name": args.name, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    result = run_seven(args, sys.argv[cut + 1:]) if args.kind == "seven" else run_plain(args)
    result = {**meta, **result}
    rank = int(os.environ.get("RANK", 0))
    path = args.result if rank == 0 else args.result.with_suffix(f".rank{rank}.json")
    path.write_text(json.dumps(result, indent=1, default=str))
    print("RESULT", json.dumps({k: result.get(k) for k in ("name", "kind", "backend", "samples_per_s",
                                                           "generate_samples_per_s", "median_generate_s",
                                                           "first_batch_s", "samples", "peak_gib")}), flush=True)


if __name__ == "__main__":
    main()
