"""Stage 7: predict a price for every test row and write `test_out.csv`; on validation, a report too.

Reads   OUTPUT of 6_train.py (WORK_DIR/train/: adapter, tokenizer, train_config.json), WORK_DIR/webdataset_test/
        (or --source jsonl), DATA_DIR/test.csv (the ids that must all be answered), WORK_DIR/jsonl/stats.json
Writes  WORK_DIR/test_out.csv            sample_id,price: every id of test.csv once, in its order, price > 0
        WORK_DIR/infer_{split}/parts/    predictions flushed as batches finish (what a rerun resumes from)
        WORK_DIR/infer_{split}/stats.json   counts per fallback reason, speed, options
        WORK_DIR/eval/ (--split validation)  report.md, predicted-vs-true and error plots, validation_pred.csv

    python 7_infer.py --work-dir work --data-dir dataset --batch-size 64
    torchrun --nproc_per_node 2 7_infer.py --work-dir work --data-dir dataset

Decoding is greedy and constrained to a number; a row that still fails (no sample, unparsable, not > 0)
gets the training median and is counted. On a GPU with `--backend hf` it runs over a static KV cache, each
decode step one CUDA-graph replay (`--decode`, common/decode.py); elsewhere through the library's generate().
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common import layout, logs, options
from common.fsio import read_json, write_json


@dataclass
class InferOptions:
    work_dir: Path = options.opt("folder every stage writes under", Path("work"))
    data_dir: Path = options.opt("folder holding test.csv (the ids to answer)", Path("dataset"))
    train_dir: str = options.opt("what 6_train.py wrote; empty: WORK_DIR/train", "")
    adapter: str = options.opt("LoRA adapter: auto (TRAIN_DIR), none (base model only), or a folder", "auto")
    model: str = options.opt("base model; default: the one TRAIN_DIR was trained from", "")
    backend: str = options.opt("unsloth, hf, or auto", "auto", choices=["auto", "unsloth", "hf"])
    split: str = options.opt("test (writes test_out.csv) or validation (writes the report)", "test",
                             choices=["test", "validation"])
    source: str = options.opt("shards (stage 5) or jsonl (stage 3, encoded on the fly)", "shards",
                              choices=["shards", "jsonl"])
    output: str = options.opt("predictions CSV; empty: WORK_DIR/test_out.csv (validation: "
                                          "WORK_DIR/eval/validation_pred.csv)", "")
    batch_size: int = options.opt("samples per generate call", 32)
    workers: int = options.opt("dataloader worker processes", 2)
    sort_by_length: bool = options.opt("batch samples of similar length together (less padding)", True)
    sort_window: int = options.opt("batches per length-sorting window", 16)
    flush_every: int = options.opt("write a part file every N batches", 4)
    constrained: bool = options.opt("constrain decoding to a number", True)
    compile: str = options.opt("torch.compile: auto (vision on a GPU), none, vision (the vision blocks), vision+mlp "
                               "(and the language model's MLPs and norms)", "auto",
                               choices=["auto", "none", "vision", "vision+mlp"])
    float_constants: bool = options.opt("compile the model's float attributes (norm eps, attention scaling) as "
                                        "constants, not as CPU scalars read back in each compiled block, as "
                                        "6_train.py does: the same predictions on an H100, ~1 s less compiling "
                                        "(bench/RESULTS.md); hf backend, compiled blocks", True)
    vision_attention: str = options.opt("bucketed: one attention call per window length in the vision tower; "
                                        "sdpa: the library's one call per window", "bucketed",
                                        choices=["bucketed", "sdpa"])
    cudnn_attention: bool = options.opt("let attention use cuDNN (PyTorch's pick on an H100): it builds a plan for "
                                        "every new sequence length, and each decode step is one", False)
    vision_mlp_multiple: int = options.opt("zero-pad the vision tower's MLP width to a multiple of this (3B: 3,420 -> "
                                           "3,456), so its GEMMs run aligned (exact; hf backend; 0: off)", 128)
    decode: str = options.opt("auto (graphs on a GPU with the hf backend, else generate), generate (the library's "
                              "loop), static (a static KV cache, eager), graphs (static, each decode step one "
                              "CUDA-graph replay)", "auto", choices=["auto", "generate", "static", "graphs"])
    skip_corrupt_shards: bool = options.opt("answer rows of unreadable shards with the fallback", True)

    def problems(self) -> list[str]:
        out = []
        if self.batch_size < 1 or self.flush_every < 1 or self.sort_window < 1:
            out.append("--batch-size, --flush-every and --sort-window must be >= 1")
        if self.vision_mlp_multiple < 0:
            out.append("--vision-mlp-multiple must be >= 0")
        if self.decode in ("static", "graphs"):
            from common.model.loading import pick_backend
            if pick_backend(self.backend) != "hf":
                out.append(f"--decode {self.decode} runs the transformers model: it needs --backend hf (here "
                           f"--backend {self.backend} means {pick_backend(self.backend)})")
        if self.decode == "graphs":
            import torch
            if not torch.cuda.is_available():
                out.append("--decode graphs needs a GPU (CUDA graphs); on CPU use static or generate")
        if self.adapter == "auto" and not (self.tdir / "train_config.json").exists():
            out.append(f"{self.tdir}/train_config.json not found: run 6_train.py, or pass --adapter none --model M")
        if self.adapter == "none" and not self.model and not (self.tdir / "train_config.json").exists():
            out.append("--adapter none needs --model")
        if self.split == "test" and not (self.data_dir / "test.csv").exists():
            out.append(f"{self.data_dir / 'test.csv'} not found (--data-dir)")
        if not (layout.jsonl_dir(self.work_dir) / "stats.json").exists():
            out.append(f"{layout.jsonl_dir(self.work_dir) / 'stats.json'} not found: run 3_create_jsonl.py first")
        return out

    def memory_hint(self) -> str:
        import torch
        total = (f"{torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30:.0f} GiB"
                 if torch.cuda.is_available() else "no GPU")
        return f" in stage 7 at batch size {self.batch_size}, with {total}: lower --batch-size"

    @property
    def tdir(self) -> Path:
        return Path(self.train_dir) if self.train_dir else layout.train_output_dir(self.work_dir)

    @property
    def out_csv(self) -> Path:
        if self.output:
            return Path(self.output)
        return layout.test_out_path(self.work_dir) if self.split == "test" else self.work_dir / "eval" / "validation_pred.csv"


def expected_rows(cfg: InferOptions) -> tuple[list[str], dict[str, float]]:
    """The ids that must be answered, in order, and their true prices where known (validation)."""
    if cfg.split == "test":
        from common.data.catalog import read_catalog
        return read_catalog(cfg.data_dir / "test.csv", "test").rows["sample_id"].tolist(), {}
    from common.data.chat_jsonl import read_jsonl
    rows = read_jsonl(layout.jsonl_path(cfg.work_dir, "validation"))
    return [r["sample_id"] for r in rows], {r["sample_id"]: r["price"] for r in rows}


def build_stream(cfg: InferOptions, model_path: str, spec, encoding: dict):
    if cfg.source == "jsonl":
        from common.data.jsonl_source import JsonlStream
        return JsonlStream(layout.jsonl_path(cfg.work_dir, cfg.split), model_path, spec, encoding["max_length"],
                           encoding["min_pixels"], encoding["max_pixels"])
    from common.data.shards import ShardStream
    return ShardStream(layout.shards_dir(cfg.work_dir, cfg.split), spec, skip_corrupt=cfg.skip_corrupt_shards,
                       normalize=False)


def load_model(cfg: InferOptions, base: str, adapter: str | None):
    """(model with the speed options applied, backend actually used, static decoder or None for generate())."""
    import torch

    from common.model.loading import (compile_blocks, load_for_inference, make_decoder, pad_vision_mlp,
                                 use_cudnn_attention)
    from common.speed.vision_attention import use_bucketed_vision_attention
    model, backend = load_for_inference(base, adapter, cfg.backend)
    if cfg.vision_attention == "bucketed":
        use_bucketed_vision_attention(model)
    if backend == "hf":
        pad_vision_mlp(model, cfg.vision_mlp_multiple)  # before compiling: the blocks compile with its shapes
    which = cfg.compile
    if which == "auto":  # the language model decodes token by token with a growing cache: vision blocks only
        which = "vision" if torch.cuda.is_available() else "none"
    compile_blocks(model, which, backend, float_constants=cfg.float_constants)
    use_cudnn_attention(cfg.cudnn_attention)
    return model, backend, make_decoder(model, cfg.decode, backend)


def main(cfg: InferOptions) -> dict:
    from common.model.loading import import_backend
    import_backend(cfg.backend)  # Unsloth, if chosen, must be imported before transformers
    import torch
    import torch.distributed as dist

    from common.model.collate import for_tokenizer
    from common.data.encode import ImageSpec
    from common.model.inference import merge, read_parts, run_predictions, write_predictions_csv
    from common.model.loading import bind_local_gpu, resolve_model
    from common.data.encode import load_tokenizer
    from common.speed.positions import HostLayout
    log = logs.setup("infer")
    rank, world = logs.rank(), int(os.environ.get("WORLD_SIZE", 1))
    bind_local_gpu()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    train_cfg = read_json(cfg.tdir / "train_config.json") if (cfg.tdir / "train_config.json").exists() else {}
    base = resolve_model(cfg.model, cfg.work_dir) if cfg.model else train_cfg["base_model"]
    adapter = {"auto": str(cfg.tdir), "none": None}.get(cfg.adapter, cfg.adapter)
    tokenizer = load_tokenizer(adapter or base)
    spec = ImageSpec.from_model(base)
    encoding = train_cfg.get("encoding", {"min_pixels": 256 * 28 * 28, "max_pixels": 512 * 28 * 28, "max_length": 2048})
    ids, truth = expected_rows(cfg)
    median = read_json(layout.jsonl_dir(cfg.work_dir) / "stats.json")["train_median_price"]
    out_dir = cfg.work_dir / f"infer_{cfg.split}"
    model, backend, decoder = load_model(cfg, base, adapter)
    log.info("%s: %d rows to answer; base %s, adapter %s, backend %s", cfg.split, len(ids), base, adapter, backend)
    collator = for_tokenizer(tokenizer, "left", with_labels=False,
                             host_ids=HostLayout.from_model(model) if backend == "hf" else None)
    run = run_predictions(model, tokenizer, build_stream(cfg, base, spec, encoding), collator, out_dir / "parts",
                          rank, cfg.batch_size, cfg.workers, cfg.sort_by_length, cfg.sort_window, cfg.flush_every,
                          cfg.constrained, expected=len(ids) // world, spec=spec, host_positions=backend == "hf",
                          decoder=decoder)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return run
    rows, reasons = merge(ids, read_parts(out_dir / "parts"), median)
    write_predictions_csv(cfg.out_csv, rows)
    stats = {"split": cfg.split, "rows_expected": len(ids), "rows_written": len(rows),
             "fallback_counts": {k: len(v) for k, v in reasons.items()}, "fallback_ids": reasons,
             "fallback_price": median, "rank0_run": run, "decode": decoder.mode if decoder else "generate",
             "world_size": world, "backend": backend,
             "output": str(cfg.out_csv), "options": options.to_jsonable(cfg)}
    if truth:
        from common.model.report import write_report
        stats["evaluation"] = write_report(cfg.work_dir / "eval", rows, truth, median)
    write_json(out_dir / "stats.json", stats)
    log.info("%d rows in, %d rows out -> %s; fallbacks %s", len(ids), len(rows), cfg.out_csv,
             stats["fallback_counts"] or "none")
    return stats


if __name__ == "__main__":
    options.run_stage(main, InferOptions, __doc__)
