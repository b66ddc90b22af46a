"""Stage 6: LoRA fine-tuning that learns only the price (Unsloth on a GPU, transformers + peft on CPU).

Reads   WORK_DIR/webdataset_{train,validation}/ (or, with --source jsonl, WORK_DIR/jsonl/ encoded on the fly)
Writes  OUTPUT_DIR (default WORK_DIR/train/): the LoRA adapter, tokenizer, image-processor config, chat
        template, prompt.json, train_config.json (resolved options + base model), stats.json,
        checkpoint-N/ (last --save-total-limit kept), runs/ (TensorBoard)

    python 6_train.py --work-dir work --model Qwen/Qwen2.5-VL-3B-Instruct --batch-size 4 --grad-accum 4
    torchrun --nproc_per_node 2 6_train.py --work-dir work --model Qwen/Qwen2.5-VL-3B-Instruct

Only the answer tokens and the `<|im_end|>` after them are learned. A rerun resumes from the newest
complete checkpoint (same data order, optimizer and scheduler state); a finished run is skipped.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from common import layout, logs, options
from common.fsio import read_json, write_json


@dataclass
class TrainOptions:
    work_dir: Path = options.opt("folder every stage writes under", Path("work"))
    output_dir: str = options.opt("where the adapter and checkpoints go; empty: WORK_DIR/train", "")
    model: str = options.opt("base model: tiny | LOCAL_DIR | HUB_ID", "tiny")
    backend: str = options.opt("unsloth (GPU), hf (transformers+peft), or auto", "auto",
                               choices=["auto", "unsloth", "hf"])
    source: str = options.opt("shards (stage 5) or jsonl (stage 3, encoded on the fly)", "shards",
                              choices=["shards", "jsonl"])
    batch_size: int = options.opt("samples per device per micro-step", 4)
    grad_accum: int = options.opt("micro-steps per optimizer step", 4)
    epochs: float = options.opt("passes over the train split (ignored if --max-steps > 0)", 1.0)
    max_steps: int = options.opt("optimizer steps; > 0 overrides --epochs", -1)
    learning_rate: float = options.opt("peak learning rate", 2e-4)
    lr_scheduler: str = options.opt("learning-rate schedule", "cosine",
                                    choices=["cosine", "linear", "constant", "constant_with_warmup"])
    warmup_ratio: float = options.opt("share of steps spent warming up", 0.03)
    weight_decay: float = options.opt("AdamW weight decay", 0.0)
    lora_r: int = options.opt("LoRA rank", 16)
    lora_alpha: int = options.opt("LoRA alpha", 32)
    lora_dropout: float = options.opt("LoRA dropout", 0.0)
    tune_vision: bool = options.opt("also put LoRA on the vision tower (frozen by default)", False)
    load_in_4bit: bool = options.opt("4-bit base weights (GPU only; bf16 compute)", True)
    gradient_checkpointing: bool = options.opt("recompute activations to save memory", False)
    loss_positions: str = options.opt("answer: run the LM head only where a token is learned (same loss, far "
                                      "less memory; hf backend, Unsloth fuses its own); all: at every position",
                                      "answer", choices=["answer", "all"])
    vision_attention: str = options.opt("bucketed: one attention call per window length in the vision tower; "
                                        "sdpa: the library's one call per window", "bucketed",
                                        choices=["bucketed", "sdpa"])
    vision_mlp_multiple: int = options.opt("zero-pad the frozen vision tower's MLP width to a multiple of this (3B: "
                                           "3,420 -> 3,456), so its GEMMs run aligned (exact; hf backend; 0: off)",
                                           128)
    compile: str = options.opt("torch.compile each block: auto (GPU: all, or vision under Unsloth; CPU: none), "
                               "none, vision, all", "auto", choices=["auto", "none", "vision", "all"])
    float_constants: bool = options.opt("compile the model's float attributes (norm eps, attention and LoRA scaling) "
                                        "as constants, not as CPU scalars read at run time: on an H100 the 3B's "
                                        "first step compiles in ~35 s instead of ~90-130, and steps run ~5% faster "
                                        "(bench/RESULTS.md); hf backend, compiled blocks", True)
    cuda_graphs: bool = options.opt("experimental: replay each compiled block's kernels as CUDA graphs (torch.compile "
                                    "mode reduce-overhead), recorded once per padded length. On an H100 a replayed "
                                    "step is 2-6% faster, but recording costs ~3 s per new length, so it pays only "
                                    "over several epochs on a slow host (bench/RESULTS.md); GPU, hf backend, "
                                    "compiled blocks, --grad-accum 1", False)
    pad_multiple: int = options.opt("pad each training batch's length up to a multiple of this, so CUDA graphs meet "
                                    "few shapes (0: 32 with --cuda-graphs, else none)", 0)
    lora_groups: str = options.opt("run the LoRA projections that read the same input (q/k/v, gate/up) as one GEMM "
                                   "each for their base weights, their A and their B matrices: fewer, larger kernels, "
                                   "peft's math (~5% a step on an H100, bench/RESULTS.md; hf backend). auto: on a GPU; "
                                   "off on the CPU, whose fp32 results then stay the library's to the bit", "auto",
                                   choices=["auto", "on", "off"])
    host_vision_indices: bool = options.opt("build the vision tower's indices (rotary positions, attention and "
                                            "window boundaries) in the loader's workers; off: the tower builds them "
                                            "on the GPU every step, reading the image grids back (hf backend)", True)
    padding_mask: bool = options.opt("mask the padding in training attention with a 4-D mask (SDPA's memory-efficient "
                                     "kernel). Off (default): causal attention alone, exact for right-padded batches "
                                     "(padding follows every real token), so SDPA runs its flash kernel: ~3% faster "
                                     "and 3.6 GiB less on an H100 (bench/RESULTS.md); hf backend", False)
    cudnn_attention: bool = options.opt("let attention use cuDNN (PyTorch's pick on an H100): it builds a plan for "
                                        "every new sequence length, which varying lengths pay again and again", False)
    group_by_length: bool = options.opt("batch samples of similar length together: less padding on a GPU, but "
                                        "less mixed batches (demo: validation SMAPE 63.5 against 57.8 without)", False)
    group_window: int = options.opt("batches per length-grouping window", 16)
    tf32: bool = options.opt("TF32 matmuls on GPU", True)
    workers: int = options.opt("dataloader worker processes per rank", 2)
    pin_memory: bool = options.opt("page-locked host batches (GPU)", True)
    persistent_workers: bool = options.opt("keep dataloader workers between epochs/evaluations", True)
    prefetch_factor: int = options.opt("batches prefetched per worker", 4)
    shuffle_buffer: int = options.opt("samples in the shuffle buffer", 1000)
    eval_steps: int = options.opt("evaluate validation SMAPE every N steps (0: only at the end)", 50)
    eval_samples: int = options.opt("validation rows used per evaluation", 200)
    eval_batch_size: int = options.opt("batch size of the evaluation's generation", 16)
    save_steps: int = options.opt("checkpoint every N steps", 100)
    save_total_limit: int = options.opt("checkpoints kept", 2)
    logging_steps: int = options.opt("log the loss every N steps", 10)
    ddp_bucket_mb: int = options.opt("under torchrun: MB of gradients per all-reduce bucket (0: DDP's 25 MB); 256 "
                                     "holds all ~120 MB of the 3B's LoRA gradients, all-reduced once after the "
                                     "backward (measured no faster on two H200s, bench/RESULTS.md)", 0)
    ddp_broadcast_buffers: bool = options.opt("under torchrun: send rank 0's buffers to every rank before each forward "
                                              "(DDP's default). Off: Qwen2.5-VL's only buffers are its rotary "
                                              "frequencies, built the same on every rank; the broadcast is a "
                                              "collective a step that makes each rank wait for the other", False)
    ddp_grads_in_buckets: bool = options.opt("under torchrun: keep the gradients inside DDP's all-reduce buckets "
                                             "(gradient_as_bucket_view). Off: DDP copies each LoRA gradient into "
                                             "its bucket and back, ~1,000 small copies a step on the 3B", True)
    ddp_split_graphs: bool = options.opt("under torchrun: let torch.compile cut each compiled block's graph at DDP's "
                                         "bucket edges (PyTorch's default). Off: one graph per block; its gradients "
                                         "still reach DDP as the block's backward ends", False)
    gc_every: int = options.opt("Python's automatic garbage collector off while training; collect every N steps "
                                "on every rank at once, and fully at evaluations and saves (0: leave it on)", 50)
    resume: bool = options.opt("continue from the newest complete checkpoint if there is one", True)
    overwrite: bool = options.opt("train again even if OUTPUT_DIR holds a finished run", False)
    text_only: bool = options.opt("ablation: drop every image (the image tokens too)", False)
    skip_corrupt_shards: bool = options.opt("skip unreadable shards (logged) instead of failing", False)
    seed: int = options.opt("seed for LoRA init and data order", 42)
    record_samples: str = options.opt("debug: write the sample_ids each rank/worker reads to this folder", "")
    min_pixels: int = options.opt("--source jsonl only: image pixel bounds as in stages 2/4", 256 * 28 * 28)
    max_pixels: int = options.opt("--source jsonl only: image pixel bounds as in stages 2/4", 512 * 28 * 28)
    max_length: int = options.opt("--source jsonl only: most tokens per sample", 2048)

    def problems(self) -> list[str]:
        out = []
        for name in ("batch_size", "grad_accum", "lora_r", "save_steps", "logging_steps", "eval_batch_size",
                     "group_window"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps <= 0 and self.epochs <= 0:
            out.append("give --epochs > 0 or --max-steps > 0")
        if not 0 <= self.warmup_ratio < 1:
            out.append("--warmup-ratio must be in [0, 1)")
        if self.learning_rate <= 0:
            out.append("--learning-rate must be > 0")
        if self.workers < 0:
            out.append("--workers must be >= 0")
        if self.vision_mlp_multiple < 0:
            out.append("--vision-mlp-multiple must be >= 0")
        if self.gc_every < 0:
            out.append("--gc-every must be >= 0")
        if self.ddp_bucket_mb < 0:
            out.append("--ddp-bucket-mb must be >= 0")
        if self.pad_multiple < 0:
            out.append("--pad-multiple must be >= 0")
        if self.cuda_graphs:
            import torch

            from common.model.loading import pick_backend
            if not torch.cuda.is_available():
                out.append("--cuda-graphs needs a GPU")
            if pick_backend(self.backend) != "hf":
                out.append("--cuda-graphs graphs the blocks this stage compiles: it needs --backend hf (Unsloth "
                           "compiles its own decoder layers)")
            if self.compile in ("none", "vision"):
                out.append("--cuda-graphs needs the decoder layers compiled: --compile all or auto")
            if self.grad_accum != 1:
                # a micro-batch's gradients would be the graphs' own output buffers, which the next micro-batch's
                # replay overwrites: wrong sums or an error (pytorch/pytorch#169545)
                out.append("--cuda-graphs needs --grad-accum 1: PyTorch's CUDA graphs do not yet accumulate "
                           "gradients over micro-batches correctly (pytorch/pytorch#169545); raise --batch-size")
        needed = ["train", "validation"]
        for split in needed:
            path = (layout.shards_dir(self.work_dir, split) / "index.json" if self.source == "shards"
                    else layout.jsonl_path(self.work_dir, split))
            if not path.exists():
                out.append(f"{path} not found: run the earlier stages first")
        return out

    def memory_hint(self) -> str:
        return (f" in stage 6 at micro-batch {self.batch_size} x {self.grad_accum} accumulation, with "
                f"{gpu_memory_text()}: lower --batch-size (a larger --grad-accum keeps the effective batch), or "
                "add --gradient-checkpointing or --load-in-4bit")

    @property
    def padded_to(self) -> int:
        return self.pad_multiple or (32 if self.cuda_graphs else 1)

    @property
    def out(self) -> Path:
        return Path(self.output_dir) if self.output_dir else layout.train_output_dir(self.work_dir)


def gpu_memory_text() -> str:
    import torch
    if not torch.cuda.is_available():
        return "no GPU"
    return f"{torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30:.0f} GiB of GPU memory"


def datasets(cfg: TrainOptions, model_path: str, spec):
    """(train stream, validation stream for evaluation, samples per epoch)."""
    if cfg.source == "jsonl":
        from common.data.jsonl_source import JsonlStream
        enc = (model_path, spec, cfg.max_length, cfg.min_pixels, cfg.max_pixels)
        train = JsonlStream(layout.jsonl_path(cfg.work_dir, "train"), *enc, shuffle=True, seed=cfg.seed, infinite=True)
        val = JsonlStream(layout.jsonl_path(cfg.work_dir, "validation"), *enc)
        return train, val, train.num_samples
    from common.data.shards import ShardStream
    train = ShardStream(layout.shards_dir(cfg.work_dir, "train"), spec, shuffle=True, shuffle_buffer=cfg.shuffle_buffer,
                        seed=cfg.seed, infinite=True, skip_corrupt=cfg.skip_corrupt_shards,
                        normalize=False)
    val = ShardStream(layout.shards_dir(cfg.work_dir, "validation"), spec, split_by_rank=False, normalize=False)
    return train, val, train.num_samples


def training_arguments(cfg: TrainOptions, max_steps: int, cuda: bool):
    from transformers import TrainingArguments
    args = TrainingArguments(
        output_dir=str(cfg.out), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=int(cfg.warmup_ratio * max_steps),
        weight_decay=cfg.weight_decay, max_steps=max_steps, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if cfg.eval_steps > 0 else "no", eval_steps=cfg.eval_steps or None,
        bf16=cuda, tf32=cuda and cfg.tf32, use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch", report_to=["tensorboard"],
        seed=cfg.seed, remove_unused_columns=False, label_names=["labels"],
        ddp_backend=("nccl" if cuda else "gloo") if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        ddp_find_unused_parameters=False, ddp_bucket_cap_mb=cfg.ddp_bucket_mb or None,
        ddp_broadcast_buffers=cfg.ddp_broadcast_buffers,
        logging_nan_inf_filter=False,  # its per-step isnan() check stalls the GPU; NonFiniteGuard stops on NaN instead
        accelerator_config={"dispatch_batches": False, "split_batches": False},
        gradient_checkpointing=False,  # set up by common.model.loading, with the frozen-vision fix
        disable_tqdm=False, log_level="info", log_level_replica="warning")
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and args.n_gpu > 1:
        # without torchrun the Trainer would wrap the model in nn.DataParallel, which breaks on Qwen2.5-VL's
        # vision tower (StopIteration in a replica) and the stream's batch plan; one process, one GPU
        logging.getLogger("train").warning("%d GPUs visible but not launched with torchrun: training on GPU 0 only "
                                           "(torchrun --nproc_per_node %d 6_train.py ... uses them all)",
                                           args.n_gpu, args.n_gpu)
        args._n_gpu = 1
    return args


def save_final(cfg: TrainOptions, model, tokenizer, model_path: str, backend: str, stats: dict) -> None:
    from common.prompt import SYSTEM_PROMPT, USER_TEMPLATE
    out = cfg.out
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ("preprocessor_config.json", "chat_template.jinja", "chat_template.json"):
        if (Path(model_path) / name).exists():
            shutil.copy(Path(model_path) / name, out / name)
    write_json(out / "prompt.json", {"system": SYSTEM_PROMPT, "user_template": USER_TEMPLATE, "price_format": "%.2f"})
    encoding = {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels, "max_length": cfg.max_length}
    stage4 = layout.preprocessed_dir(cfg.work_dir, "train") / "stats.json"
    if cfg.source == "shards" and stage4.exists():
        o = read_json(stage4)["options"]
        encoding = {k: o[k] for k in encoding}
    write_json(out / "train_config.json", {"base_model": model_path, "backend": backend, "encoding": encoding,
                                           "options": options.to_jsonable(cfg)})
    write_json(out / "stats.json", stats)
    write_json(out / "COMPLETE", {"finished": time.strftime("%Y-%m-%d %H:%M:%S")})


def training_stream(cfg: TrainOptions, train_ds):
    from common.model.training import LengthGroupedStream, RecordingStream
    if cfg.record_samples:
        train_ds = RecordingStream(train_ds, Path(cfg.record_samples))
    if cfg.group_by_length:
        train_ds = LengthGroupedStream(train_ds, cfg.batch_size, cfg.group_window, cfg.seed)
    return train_ds


def load_model(cfg: TrainOptions, model_path: str):
    """(LoRA model with the speed options applied, backend actually used)."""
    import torch
    from transformers import set_seed

    from common.speed.lora_groups import fuse_shared_input_lora
    from common.model.loading import (LoraSettings, compile_blocks, load_for_training, pad_vision_mlp,
                                 split_compiled_graphs_for_ddp, use_cudnn_attention)
    from common.speed.vision_attention import use_bucketed_vision_attention
    set_seed(cfg.seed)  # before the LoRA weights are drawn: the Trainer seeds only after the model exists
    model, backend = load_for_training(model_path, cfg.backend,
                                       LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.tune_vision),
                                       cfg.load_in_4bit, cfg.gradient_checkpointing, cfg.seed)
    if cfg.vision_attention == "bucketed":
        use_bucketed_vision_attention(model)
    if backend == "hf":
        pad_vision_mlp(model, cfg.vision_mlp_multiple)  # before compiling: the blocks compile with its shapes
        if cfg.lora_groups == "on" or (cfg.lora_groups == "auto" and torch.cuda.is_available()):
            fuse_shared_input_lora(model)
    split_compiled_graphs_for_ddp(cfg.ddp_split_graphs)
    compile_blocks(model, cfg.compile, backend, cfg.cuda_graphs, cfg.float_constants)
    use_cudnn_attention(cfg.cudnn_attention)
    return model, backend


def make_trainer(cfg: TrainOptions, model, backend: str, tokenizer, spec, train_ds, val_ds, max_steps: int,
                 samples_per_epoch: int):
    import torch

    from common.model.collate import for_tokenizer
    from common.model.loading import skip_image_readbacks
    from common.speed.positions import HostLayout
    from common.model.training import (CheckpointMarker, EpochBanner, NonFiniteGuard, PriceTrainer,
                                 ScheduledGarbageCollection)
    # position ids and vision indices built by the collator (in the loader's workers), not on the GPU; measured
    # on the transformers backend, whose forward takes them (Unsloth builds its own)
    host_ids = HostLayout.from_model(model) if backend == "hf" else None
    if host_ids is not None:
        skip_image_readbacks(model)  # the collator checks each sample's image tokens instead
    elif cfg.padding_mask:
        logging.getLogger("train").warning("--padding-mask applies to the transformers backend only; %s builds "
                                           "its own mask", backend)
    median = read_json(layout.jsonl_dir(cfg.work_dir) / "stats.json")["train_median_price"]
    eval_options = {"tokenizer": tokenizer, "dataset": val_ds, "median": median, "max_samples": cfg.eval_samples,
                    "batch_size": cfg.eval_batch_size, "spec": spec, "host_positions": backend == "hf",
                    "collator": for_tokenizer(tokenizer, "left", with_labels=False, drop_images=cfg.text_only,
                                              host_ids=host_ids)}
    trainer = PriceTrainer(model=model, args=training_arguments(cfg, max_steps, torch.cuda.is_available()),
                           train_dataset=train_ds, eval_dataset=val_ds,
                           data_collator=for_tokenizer(tokenizer, drop_images=cfg.text_only, host_ids=host_ids,
                                                       padding_mask=cfg.padding_mask, pad_multiple=cfg.padded_to,
                                                       vision_indices=cfg.host_vision_indices),
                           loader_options={"num_workers": cfg.workers, "pin_memory": cfg.pin_memory,
                                           "persistent_workers": cfg.persistent_workers,
                                           "prefetch_factor": cfg.prefetch_factor},
                           eval_options=eval_options, answer_only=cfg.loss_positions == "answer" and backend == "hf",
                           pixel_spec=spec, no_cache=backend == "hf", grads_in_buckets=cfg.ddp_grads_in_buckets,
                           cuda_graphs=cfg.cuda_graphs, samples_per_epoch=samples_per_epoch,
                           callbacks=[CheckpointMarker()])
    world = int(os.environ.get("WORLD_SIZE", 1))
    logging.getLogger("transformers.trainer").addFilter(
        EpochBanner(samples_per_epoch, world * cfg.batch_size * cfg.grad_accum, max_steps))
    trainer.add_callback(NonFiniteGuard(trainer))
    if cfg.gc_every:
        trainer.add_callback(ScheduledGarbageCollection(cfg.gc_every))
    return trainer


def main(cfg: TrainOptions) -> dict:
    from common.model.loading import import_backend
    import_backend(cfg.backend)  # Unsloth, if chosen, must be imported before transformers
    from common.data.encode import ImageSpec
    from common.model.loading import bind_local_gpu, compiled_graphs_split_for_ddp, resolve_model
    from common.data.encode import load_tokenizer
    from common.model.training import (latest_complete_checkpoint, plan_steps, ranks_hold_same_weights,
                                 remove_incomplete_checkpoints)
    log = logs.setup("train")
    if (cfg.out / "COMPLETE").exists() and not cfg.overwrite:
        log.info("%s holds a finished run; pass --overwrite to train again", cfg.out)
        return read_json(cfg.out / "stats.json")
    rank0 = logs.rank() == 0
    bind_local_gpu()
    if rank0 and (cfg.overwrite or not cfg.resume) and cfg.out.exists():
        shutil.rmtree(cfg.out)
    model_path = resolve_model(cfg.model, cfg.work_dir)
    tokenizer = load_tokenizer(model_path)
    spec = ImageSpec.from_model(model_path)
    train_ds, val_ds, num_samples = datasets(cfg, model_path, spec)
    world = int(os.environ.get("WORLD_SIZE", 1))
    max_steps = plan_steps(num_samples, world, cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps)
    log.info("%d train samples, world %d x batch %d x accum %d -> %d steps", num_samples, world, cfg.batch_size,
             cfg.grad_accum, max_steps)
    model, backend = load_model(cfg, model_path)
    trainer = make_trainer(cfg, model, backend, tokenizer, spec, training_stream(cfg, train_ds), val_ds, max_steps,
                           num_samples)
    if rank0 and cfg.out.exists():
        remove_incomplete_checkpoints(cfg.out)
    resume_from = latest_complete_checkpoint(cfg.out) if cfg.resume else None
    log.info("backend %s, loss at %s positions, %s vision attention; %s", backend,
             "answer" if trainer.answer_only else "all", cfg.vision_attention,
             f"resuming from {resume_from}" if resume_from else "starting fresh")
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.raise_if_nonfinite(trainer.state.global_step)
    final_eval = trainer.evaluate()
    in_step = ranks_hold_same_weights(trainer.model)
    if in_step is False:
        log.error("the ranks ended with different LoRA weights: DDP did not keep them in step; rank 0's are saved")
    stats = {"steps": trainer.state.global_step, "train_loss": result.training_loss, "backend": backend,
             "seconds": round(time.time() - started, 1), "resumed_from": str(resume_from) if resume_from else None,
             "samples_seen": trainer.state.global_step * world * cfg.batch_size * cfg.grad_accum,
             "final_eval": final_eval, "log_history": trainer.state.log_history, "world_size": world,
             "ddp_bucket_mb": getattr(trainer.model_wrapped, "bucket_bytes_cap", 0) / 2**20 or None,
             "ddp_split_graphs": compiled_graphs_split_for_ddp(),
             "ddp_broadcast_buffers": getattr(trainer.model_wrapped, "broadcast_buffers", None),
             "ddp_grads_in_buckets": getattr(trainer.model_wrapped, "gradient_as_bucket_view", None),
             "ranks_hold_same_weights": in_step}
    if trainer.is_world_process_zero():
        save_final(cfg, trainer.accelerator.unwrap_model(trainer.model), tokenizer, model_path, backend, stats)
        log.info("saved to %s: %s", cfg.out, json.dumps(final_eval))
    return stats


if __name__ == "__main__":
    options.run_stage(main, TrainOptions, __doc__)
