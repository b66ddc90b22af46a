"""Write the <!-- gpu --> section of bench/RESULTS.md from bench/gpu_bench.py's results.json file(s).

    python bench/gpu_report.py RUN1/results.json [RUN2/results.json ...] --write [--json bench/gpu_results.json]

Later files add phases to (or replace phases of) earlier ones; prediction equality between the inference
runs is recomputed over the merged set. --json keeps the figures (no per-row predictions) in the repo.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_results import RESULTS, update_section  # noqa: E402

TRAIN = ("train_hf", "train_unsloth")
INFER = ("infer_plain", "infer_seven_hf", "infer_seven_hf_free", "infer_seven_unsloth")
PAIRS = [("infer_plain", "infer_seven_hf_free"), ("infer_plain", "infer_seven_hf"),
         ("infer_seven_hf_free", "infer_seven_hf")]


def merge(paths: list[Path]) -> dict:
    merged, envs = {}, []
    for p in paths:
        r = json.loads(p.read_text())
        envs.append(r.pop("env", {}))
        r.pop("equality", None)
        merged.update({k: v for k, v in r.items() if not str(v.get("status", "")).startswith("skipped")})
    merged["envs"] = envs
    return merged


def equality(r: dict) -> dict:
    out = {}
    for x, y in PAIRS:
        gx, gy = (r.get(x) or {}).get("result") or {}, (r.get(y) or {}).get("result") or {}
        px, py, tx, ty = gx.get("predictions"), gy.get("predictions"), gx.get("texts"), gy.get("texts")
        if not px or not py:
            continue
        ids = sorted(set(px) & set(py))
        same = sum((px[i] is None and py[i] is None) or (None not in (px[i], py[i]) and abs(px[i] - py[i]) < 1e-9)
                   for i in ids)
        out[f"{x} vs {y}"] = {"rows": len(ids), "same_text": sum(tx.get(i) == ty.get(i) for i in ids) if tx and ty
                              else None, "same_price": same, "parsed": [sum(px[i] is not None for i in ids),
                                                                         sum(py[i] is not None for i in ids)],
                              "distinct_texts": [len(set(tx.values())) if tx else None,
                                                 len(set(ty.values())) if ty else None]}
    return out


def res(r: dict, name: str) -> dict:
    return (r.get(name) or {}).get("result") or {}


def render(r: dict, eq: dict) -> str:
    env = next((e for e in r["envs"] if e), {})
    tr = {n: res(r, n) for n in TRAIN}
    inf = {n: res(r, n) for n in INFER}
    v = next((x["versions"] for x in tr.values() if x.get("versions")), {})
    data = res(r, "data")
    build = res(r, "build")
    date = next((x.get("date") for x in list(tr.values()) + list(inf.values()) if x.get("date")), "?")
    hf, us = tr["train_hf"], tr["train_unsloth"]
    L = ["## Training and inference on the GPU (`bench/gpu_bench.py`)", ""]
    L.append(f"Device: {env.get('device_info', '?')} (driver), {env.get('cpus', '?')} CPU cores; torch "
             f"{v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}, accelerate "
             f"{v.get('accelerate')}, unsloth {v.get('unsloth')}, bitsandbytes {v.get('bitsandbytes')}; {date[:10]}. "
             "No flash-attn or xformers (sdpa attention).")
    L.append("")
    L.append(f"Model: the Qwen2.5-VL-3B architecture with random weights ({build.get('params', 0) / 1e9:.2f} B "
             "parameters, bf16, built on the GPU by `bench/gpu_build_model.py`) with the real Qwen2.5 tokenizer. "
             "Data (`bench/gpu_make_data.py`): real catalog text (real_catalog_2k.csv: first 512 rows -> train/"
             "validation, last 512 -> test), one drawn 448x448 JPEG per row (256 image tokens), then the "
             "pipeline's own stages 3, 4 (--min/max-pixels 200704) and 5. Train/validation encoded with "
             "--max-length 768, test with 2048 (nothing cut).")
    if data:
        t, s = data.get("train", {}), data.get("test", {})
        L.append(f"Tokens per sample: train {t.get('samples')} samples, median {t.get('tokens_median')}, mean "
                 f"{t.get('tokens_mean')}, max {t.get('tokens_max')} ({t.get('notes', {}).get('truncated', 0)} "
                 f"catalogs cut at 768); test {s.get('samples')} samples, median {s.get('tokens_median')}, mean "
                 f"{s.get('tokens_mean')}, max {s.get('tokens_max')}.")
    L += ["", "### Training: stage 6 as it is, per backend (`bench/gpu_train_speed.py`)", ""]
    L.append("6_train.py's main() (Trainer, shard loader with 4 workers, collator), LoRA r=16 alpha=32 on the "
             "language model's 7 projections, no gradient checkpointing, --grad-accum 1, 25 steps, "
             "--logging-steps 1, an evaluation (16 validation rows, generation) at step 20. A callback "
             "synchronizes the GPU at every step's start and end; samples/s = batch / median time from one step's "
             "end to the next (data wait included), over steps 6-25 less the one that holds the evaluation. "
             "Peak = torch.cuda.max_memory_allocated() over the training steps, weights included.")
    L += ["", "| run | backend, weights | batch | samples/s | median step s | peak GiB (reserved) | first step s | "
              "loss step 1 -> 25 | all finite | eval at step 20 s |", "|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for name, label, what in (("train_hf", "baseline", "transformers+peft, bf16"),
                              ("train_unsloth", "ours", "Unsloth, 4-bit (bnb nf4), bf16 compute")):
        x = tr[name]
        if not x:
            L.append(f"| {label} | {what} | | not run ({(r.get(name) or {}).get('status')}) | | | | | | |")
            continue
        ev = next((e["seconds"] for e in x.get("evals", []) if e["step"] < x.get("steps_done", 0)), None)
        L.append(f"| {label} | {what} | {x['samples_per_step']} | **{x.get('samples_per_s')}** | "
                 f"{x.get('median_interval_s')} | {x.get('train_peak_gib')} ({x.get('train_peak_reserved_gib')}) | "
                 f"{x.get('first_step_s')} | {x['loss_first']:.2f} -> {x['loss_last']:.2f} | "
                 f"{x.get('all_losses_finite')} | {ev} |")
    if hf.get("samples_per_s") and us.get("samples_per_s"):
        L.append("")
        L.append(f"Unsloth 4-bit at batch {us['samples_per_step']}: {us['samples_per_s'] / hf['samples_per_s']:.2f}x "
                 f"the baseline's samples/s, at {us['train_peak_gib']} GiB against {hf['train_peak_gib']}. Both "
                 f"train LoRA with the same trainable parameter count (baseline: 252 modules, 29.9 M; Unsloth's "
                 "banner: 29,933,568). Unsloth's first step compiles (~60 s); its first generation (the step-20 "
                 "evaluation) took 29.9 s against 1.3 s for the next one, and training went on after it with "
                 "finite losses. A few early baseline steps took 2.1-2.7 s (new padded lengths; cause not "
                 "established); the median leaves them out. Model load: "
                 f"baseline {hf.get('model_load_s')} s, Unsloth {us.get('model_load_s')} s (import, 4-bit "
                 "quantization of the bf16 checkpoint, compile set-up).")
        L.append(f"Per-step times (s), baseline: {hf.get('step_times_s')}; Unsloth: {us.get('step_times_s')}.")
    L += ["", "### Inference: stage 7 against a plain `model.generate` loop (`bench/gpu_infer_speed.py`)", ""]
    L.append("The same 512 test rows, batch 64, greedy, 10 new tokens at most, the adapter trained above (the "
             "baseline's bf16 adapter, merged, for the transformers runs; Unsloth's for the Unsloth run). "
             "Plain loop = what a user writes: `AutoProcessor`, the chat template, PIL images, "
             "`processor(text, images, padding=True)` in file order, `Qwen2_5_VLForConditionalGeneration` (bf16, "
             "sdpa) + `PeftModel.merge_and_unload()`, `model.generate(max_new_tokens=10)`. Stage 7 = `7_infer.py "
             "--split test --batch-size 64 --workers 4` on the stage-5 shards (length-sorted windows, left padding, "
             "number-constrained decoding unless --no-constrained). The first batch (CUDA warm-up; Unsloth "
             "compiles) is left out: samples/s = the other 448 rows / wall time after the first batch, data "
             "preparation and decoding included; generate-only counts the generate calls alone.")
    L += ["", "| run | samples/s | generate-only samples/s | median batch s | mean padded prompt tokens | "
              "first batch s | peak GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    labels = {"infer_plain": "baseline: plain transformers loop, bf16, unconstrained",
              "infer_seven_hf": "ours: 7_infer --backend hf, bf16, constrained",
              "infer_seven_hf_free": "7_infer --backend hf, bf16, --no-constrained",
              "infer_seven_unsloth": "7_infer --backend unsloth, 4-bit, constrained"}
    for name in INFER:
        x = inf[name]
        if not x:
            L.append(f"| {labels[name]} | not run ({(r.get(name) or {}).get('status')}) | | | | | |")
            continue
        L.append(f"| {labels[name]} | **{x.get('samples_per_s')}** | {x.get('generate_samples_per_s')} | "
                 f"{x.get('median_generate_s')} | {x.get('prompt_tokens_mean')} | {x.get('first_batch_s')} | "
                 f"{x.get('peak_gib')} |")
    base = inf["infer_plain"].get("samples_per_s")
    if base:
        ratios = ", ".join(f"{labels[n].split(':')[0] if ':' in labels[n] else labels[n]} "
                           f"{inf[n]['samples_per_s'] / base:.2f}x" for n in INFER[1:] if inf[n].get("samples_per_s"))
        L.append("")
        L.append(f"Against the plain loop: {ratios}. The plain loop pads each batch of 64 to its longest row "
                 f"(mean {inf['infer_plain'].get('prompt_tokens_mean')} tokens a row) where stage 7's length-sorted "
                 f"batches hold {inf['infer_seven_hf'].get('prompt_tokens_mean')}; it also runs the processor on "
                 f"the CPU inside the loop ({inf['infer_plain'].get('median_prepare_s')} s a batch). Constrained "
                 "decoding stops each row at `<|im_end|>` after a number; unconstrained rows of this barely "
                 "trained random model often run to the 10-token limit, hence the slower --no-constrained run. "
                 "7_infer's own stats.json figure (whole run, first batch and loader start included) was "
                 f"{(inf['infer_seven_hf'].get('run') or {}).get('samples_per_s')} samples/s for ours.")
    if eq:
        L += ["", "Predictions, row by row (decoded text and parsed price):", ""]
        L += ["| pair | rows | same text | same price | rows with a price | distinct texts |", "|---|---:|---:|---:|---|---|"]
        for k, e in eq.items():
            L.append(f"| {k} | {e['rows']} | {e['same_text']} | {e['same_price']} | {e['parsed'][0]} / "
                     f"{e['parsed'][1]} | {e['distinct_texts'][0]} / {e['distinct_texts'][1]} |")
        L.append("")
        L.append("The plain loop and 7_infer --no-constrained feed the model the same token ids and pixels "
                 "(checked on the CPU machine, PIL image processor, 20 test rows: same ids, pixel values within "
                 "1e-5; on the GPU machine AutoProcessor took the torchvision image processor); what differs is batch composition and padding (file order against length-sorted), which moves bf16 "
                 "logits slightly, and this random-weight model trained for 25 steps has many near-ties, so some "
                 "rows diverge after a few tokens. Against the constrained run texts differ by design "
                 "(every constrained row is a number).")
    L += ["", "Reproduce (one device call, ~9 min on this machine; wheels from ../shared/device/wheels.sh, "
              "bench/assets/ = copies of ../shared/qwen2.5-vl-processor and ../shared/data/real_catalog_2k.csv, "
              "carried as `.whl` and `bench/assets`):", "",
          "```",
          "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl",
          "export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 "
          "TOKENIZERS_PARALLELISM=false",
          "python3 bench/gpu_bench.py --out $OUT --deadline 550 --train-rows 512 --test-rows 512 --steps 25 "
          "--eval-steps 20 --limits build=150,data=120,train_unsloth=270,train_hf=130,infer=90,infer_seven_unsloth=200",
          "python bench/gpu_report.py OUT/results.json --write   # here, from the results that came back",
          "```", "",
          "Here the deadline left the last two inference runs out of that call; they ran in a second call on the "
          "same warm machine (same /tmp model, data and adapters): `--phases infer_seven_unsloth,"
          "infer_seven_hf_free`. Not measured yet: an H100 (FINDINGS' figures are from one; compare only within a "
          "table), multi-GPU (torchrun) scaling."]
    return "\n".join(L)


def compact(r: dict, eq: dict) -> dict:
    out = {"equality": eq, "envs": r["envs"]}
    for k, v in r.items():
        if k == "envs" or not isinstance(v, dict):
            continue
        x = dict(v)
        x.pop("log_tail", None)
        if isinstance(x.get("result"), dict):
            x["result"] = {a: b for a, b in x["result"].items() if a not in ("predictions", "texts", "batch_log")}
            x["result"]["batch_log"] = v["result"].get("batch_log")
        out[k] = x
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md (else print)")
    ap.add_argument("--json", type=Path, help="also write the figures (no per-row predictions) here")
    args = ap.parse_args()
    r = merge(args.results)
    eq = equality(r)
    body = render(r, eq)
    if args.json:
        args.json.write_text(json.dumps(compact(r, eq), indent=1, default=str) + "\n")
    if args.write:
        update_section(RESULTS, "gpu", body)
    print(body)


if __name__ == "__main__":
    main()
