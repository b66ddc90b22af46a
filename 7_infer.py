"""Stage 7: predict a price for every test row and write `test_out.csv`; on validation, a report too.

Reads   WORK_DIR/train/ (adapter, train_config.json), WORK_DIR/webdataset_{split}/ (or --source jsonl),
        DATA_DIR/test.csv (every id to answer), WORK_DIR/jsonl/stats.json (the training median)
Writes  WORK_DIR/test_out.csv   sample_id,price: every id of test.csv once, in its order, price > 0
        WORK_DIR/infer_{split}/parts/ (what a rerun resumes from, while run-rNNN.json there, the model, samples and
            options that wrote them, still match), WORK_DIR/infer_{split}/stats.json
        WORK_DIR/eval/ (--split validation): report.md, plots, validation_pred.csv
        WORK_DIR/embeddings/{split}.npy + {split}_ids.csv (--embeddings): one pooled vector per id, in their order

    python 7_infer.py --work-dir work --data-dir dataset
    torchrun --nproc_per_node 2 7_infer.py --work-dir work --data-dir dataset
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from common import layout, logs, options
from common.fsio import read_json
from common.options import opt


@dataclass
class InferOptions:
    _argument_group_name = "data and model"
    work_dir: Path = opt("folder every stage writes under", Path("work"))
    data_dir: Path = opt("folder holding test.csv (the ids to answer)", Path("dataset"))
    split: str = opt("test (writes test_out.csv), validation (the report too) or train", "test",
                     ["test", "validation", "train"])
    embeddings: bool = opt("write each row's pooled vector (for stacking) instead of prices", False)
    train_dir: str = opt("what 6_train.py wrote; empty: WORK_DIR/train", "")
    adapter: str = opt("LoRA adapter: auto (TRAIN_DIR), none (the base model alone) or a folder", "auto")
    model: str = opt("base model; empty: the one TRAIN_DIR was trained from", "")
    shards: str = opt("shards of each {split}: a folder, URL, brace pattern or pipe: command; empty: WORK_DIR's", "")
    output: str = opt("predictions CSV; empty: WORK_DIR/test_out.csv or WORK_DIR/eval/validation_pred.csv", "")


@dataclass
class InferDeviceOptions:
    _argument_group_name = "device and batches (auto: planned from the GPU found; a value given is kept)"
    backend: str = opt("hf (transformers + peft), unsloth, or auto", "auto", ["auto", "hf", "unsloth"])
    dtype: str = opt("compute dtype", "auto",
                     ["auto", "bfloat16", "float16", "float32"])
    batch_size: int = opt("samples per batch (0: auto; 32 on a CPU)", 0)
    max_gpu_memory: float = opt("GiB of GPU memory this process may use (0: the card's)", 0.0)
    workers: int = opt("data loader processes", 2)


@dataclass
class InferAdvancedOptions:
    _argument_group_name = "advanced: A/B switches and debugging"
    hidden = True
    speedups_off: str = opt("speed levers to turn off, comma-separated (common/speed/__init__.py)", "")
    constrained: bool = opt("constrain decoding to a number", True)
    sort_by_length: bool = opt("batch samples of similar length together (less padding)", True)
    sort_window: int = opt("batches per length-sorting window", 16)
    flush_every: int = opt("write a part file every N batches", 4)
    skip_corrupt_shards: bool = opt("answer rows of unreadable shards with the fallback", True)
    source: str = opt("shards (stage 5) or jsonl (stage 3, encoded on the fly)", "shards", ["shards", "jsonl"])
    text_only: bool = opt("ablation: drop every image and its tokens (as 6_train.py --text-only)", False)
    run_dir: str = opt("where the part files and stats.json go; empty: WORK_DIR/infer_SPLIT", "")


@dataclass
class InferConfig:
    data: InferOptions
    device: InferDeviceOptions
    advanced: InferAdvancedOptions

    def problems(self) -> list[str]:
        from common.model.loading import adapter_problem, backend_problem
        from common.speed import lever_problems
        from common.model.plan import Device
        out = []
        if self.device.batch_size < 0 or self.device.max_gpu_memory < 0:
            out.append("--batch-size and --max-gpu-memory must be >= 0")
        if min(self.advanced.flush_every, self.advanced.sort_window) < 1:
            out.append("--flush-every and --sort-window must be >= 1")
        device = Device.detect()
        if device is None and (self.device.dtype not in ("auto", "float32") or self.device.max_gpu_memory):
            out.append("--dtype other than float32 and --max-gpu-memory need a CUDA GPU; this machine has none")
        elif device is not None and self.device.dtype == "bfloat16" and not device.bf16:
            out.append(f"--dtype bfloat16: {device.name} has no bf16; use float16 (or auto)")
        out += backend_problem(self.device.backend)
        out += lever_problems(self.advanced.speedups_off)
        if self.data.adapter == "auto" and not (self.tdir / "train_config.json").exists():
            out.append(f"{self.tdir}/train_config.json not found: run 6_train.py, or pass --adapter none --model M")
        if self.data.adapter not in ("auto", "none") and adapter_problem(self.data.adapter):
            out.append(adapter_problem(self.data.adapter))
        if self.data.adapter == "none" and not self.data.model and not (self.tdir / "train_config.json").exists():
            out.append("--adapter none needs --model")
        if self.data.split == "train" and not self.data.embeddings:
            out.append("--split train writes embeddings only: add --embeddings")
        if self.data.split == "test" and not (self.data.data_dir / "test.csv").exists():
            out.append(f"{self.data.data_dir / 'test.csv'} not found (--data-dir)")
        if not (layout.jsonl_dir(self.data.work_dir) / "stats.json").exists():
            out.append(f"{layout.jsonl_dir(self.data.work_dir) / 'stats.json'} not found: run 3_create_jsonl.py first")
        if not self.data.embeddings:
            out += output_problems(self.out_csv, "--output" if self.data.output else "the output")
        return out

    def memory_hint(self) -> str:
        from common.model.loading import gpu_memory_text
        return f" in stage 7, with {gpu_memory_text()}: pass a smaller --batch-size"

    @property
    def tdir(self) -> Path:
        return Path(self.data.train_dir) if self.data.train_dir else layout.train_output_dir(self.data.work_dir)

    @property
    def run_dir(self) -> Path:
        return Path(self.advanced.run_dir) if self.advanced.run_dir else \
            self.data.work_dir / f"infer_{self.data.split}{'_embeddings' if self.data.embeddings else ''}"

    def fingerprint_settings(self, plan, backend: str, dtype: str) -> dict:
        """The options that change a part file's predictions or its batches, as resolved (the plan's batch, the
        backend and dtype loaded: auto may pick others on another machine). The loader interleaves its workers'
        samples and ranks share them out, so --workers and the world size also decide which samples share a batch."""
        a = self.advanced
        return {"embeddings": self.data.embeddings, "batch_size": plan.batch, "backend": backend, "dtype": dtype,
                "sort_by_length": a.sort_by_length, "sort_window": a.sort_window, "constrained": a.constrained,
                "text_only": a.text_only, "source": a.source, "shards": self.data.shards,
                "workers": self.device.workers, "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                "speedups_off": a.speedups_off}

    @property
    def out_csv(self) -> Path:
        if self.data.output:
            return Path(self.data.output)
        if self.data.split == "test":
            return layout.test_out_path(self.data.work_dir)
        return self.data.work_dir / "eval" / "validation_pred.csv"


def output_problems(path: Path, what: str) -> list[str]:
    """The predictions file must be one that can be written, checked before the inference rather than after it:
    not a folder, under a folder that exists or can be made."""
    if path.is_dir():
        return [f"{what} {path} is a folder: name the CSV file to write (--output)"]
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [f"{what} {path}: {parent} is a file, so its folder cannot be made"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"{what} {path}: {parent} is not writable"]
    return []


def expected_rows(cfg: InferConfig) -> tuple[list[str], dict[str, float]]:
    """The ids that must be answered, in order, and their true prices where known (validation)."""
    if cfg.data.split == "test":
        from common.data.catalog import read_catalog
        return read_catalog(cfg.data.data_dir / "test.csv", "test").rows["sample_id"].tolist(), {}
    from common.data.chat_jsonl import read_jsonl
    rows = read_jsonl(layout.jsonl_path(cfg.data.work_dir, cfg.data.split))
    return [r["sample_id"] for r in rows], {r["sample_id"]: r["price"] for r in rows}


def predictor(cfg: InferConfig, objective: str, model, tokenizer, spec, decoder):
    """(predict(batch), whether it gives vectors, whether its batches are the head's pooled ones)."""
    from common.model.inference import embedding_predictor, regression_predictor, text_predictor
    if cfg.data.embeddings:
        return embedding_predictor(model, spec), True, True
    if objective == "regression":
        from common.model.head import load_head
        head, floor = load_head(cfg.tdir, next(model.parameters()).device)
        return regression_predictor(model, head, floor, spec), False, True
    return text_predictor(model, tokenizer, cfg.advanced.constrained, spec, decoder), False, False


def main(cfg: InferConfig) -> dict:
    from common.model.loading import import_backend
    import_backend(cfg.device.backend)  # Unsloth, if chosen, must be imported before transformers
    from common.data.encode import ImageSpec, load_tokenizer
    from common.data.shards import planning_tokens
    from common.data.streams import open_stream
    from common.model.collate import for_tokenizer
    from common.model.distributed import init_distributed
    from common.model import inference as inf
    from common.model.loading import bind_local_gpu, cap_gpu_memory, load_inference_model, resolve_model
    from common.model.plan import Device, ModelSize, plan_inference
    from common.speed import parse_off
    log = logs.setup("infer")
    rank, world = logs.rank(), int(os.environ.get("WORLD_SIZE", 1))
    bind_local_gpu()
    cap_gpu_memory(cfg.device.max_gpu_memory)
    init_distributed()
    train_cfg = read_json(cfg.tdir / "train_config.json") if (cfg.tdir / "train_config.json").exists() else {}
    base = resolve_model(cfg.data.model, cfg.data.work_dir) if cfg.data.model else train_cfg["base_model"]
    adapter = {"auto": str(cfg.tdir), "none": None}.get(cfg.data.adapter, cfg.data.adapter)
    objective = train_cfg.get("objective", "text") if adapter else "text"
    tokenizer, spec = load_tokenizer(adapter or base), ImageSpec.from_model(base)
    encoding = train_cfg.get("encoding", {"min_pixels": 256 * 28 * 28, "max_pixels": 512 * 28 * 28, "max_length": 2048})
    ids, truth = expected_rows(cfg)
    median = read_json(layout.jsonl_dir(cfg.data.work_dir) / "stats.json")["train_median_price"]
    decoding = objective == "text" and not cfg.data.embeddings
    model, backend, host, decoder = load_inference_model(base, adapter, cfg.device.backend, cfg.device.dtype,
                                                         parse_off(cfg.advanced.speedups_off), decoding)
    predict, vectors, pooled = predictor(cfg, objective, model, tokenizer, spec, decoder)
    stream = open_stream(cfg.advanced.source, cfg.data.work_dir, cfg.data.split, spec, base, encoding,
                         skip_corrupt=cfg.advanced.skip_corrupt_shards, shards=cfg.data.shards)
    index, dtype = getattr(stream, "index", {}), str(next(model.parameters()).dtype).split(".")[-1]
    plan = plan_inference(cfg.device.batch_size, backend, dtype, "graphs" if decoder else "generate" if decoding
                          else "one forward", Device.detect(), ModelSize.of(base), planning_tokens(index)[0],
                          cfg.device.max_gpu_memory)
    logs.every_rank(plan.line(world))
    log.info("%s: %d rows; base %s, adapter %s, objective %s", cfg.data.split, len(ids), base, adapter, objective)
    fingerprint = inf.prediction_fingerprint(base, adapter, objective, cfg.fingerprint_settings(plan, backend, dtype),
                                             index, layout.jsonl_path(cfg.data.work_dir, cfg.data.split))
    stale = inf.claim_parts(cfg.run_dir / "parts", rank, world, fingerprint)
    collator = for_tokenizer(tokenizer, "left", with_labels=False, host_ids=host, pooled=pooled,
                             drop_images=cfg.advanced.text_only)
    run = inf.run_predictions(predict, stream, collator, cfg.run_dir / "parts", rank, plan.batch, cfg.device.workers,
                              cfg.advanced.sort_by_length, cfg.advanced.sort_window, cfg.advanced.flush_every,
                              expected=len(ids) // world, vectors=vectors)
    predictions = inf.gathered_parts(cfg.run_dir / "parts", rank, vectors)
    if rank != 0:
        return run
    stats = {"split": cfg.data.split, "rows_expected": len(ids), "objective": objective, "rank0_run": run,
             "plan": asdict(plan), "world_size": world, "options": options.to_jsonable(cfg),
             "fingerprint": fingerprint, "restarted_because": stale}
    inf.write_outputs(cfg.data.work_dir, cfg.data.split, cfg.out_csv, cfg.run_dir / "stats.json", ids, predictions,
                      median, index, truth, vectors, stats)
    return stats


if __name__ == "__main__":
    from common.model.loading import import_unsloth_if_asked
    import_unsloth_if_asked(sys.argv[1:])
    options.run_stage(main, InferConfig, __doc__)
