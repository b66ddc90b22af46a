"""Stage 6: LoRA fine-tuning that learns only the price (Unsloth or transformers + peft).

Reads   WORK_DIR/webdataset_{train,validation}/ (or --shards: URLs, patterns, pipes; or JSONL, --source jsonl)
Writes  OUTPUT_DIR (WORK_DIR/train/): adapter (+ price head), tokenizer, image settings, prompt.json,
        train_config.json, stats.json, checkpoint-N/, runs/ (TensorBoard)

    python 6_train.py --work-dir work --model Qwen/Qwen2.5-VL-3B-Instruct
    torchrun --nproc_per_node 2 6_train.py --work-dir work --model Qwen/Qwen2.5-VL-3B-Instruct

A rerun resumes from the newest complete checkpoint; a finished run is skipped."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import layout, logs, options
from common.fsio import read_json
from common.options import opt


@dataclass
class DataOptions:
    _argument_group_name = "data and model"
    work_dir: Path = opt("folder every stage writes under", Path("work"))
    output_dir: str = opt("where the adapter and checkpoints go; empty: WORK_DIR/train", "")
    shards: str = opt("shards of each {split}: a folder, URL, brace pattern or pipe: command; empty: WORK_DIR's", "")
    model: str = opt("base model: tiny | LOCAL_DIR | HUB_ID; empty: the one 4_preprocess.py encoded with", "")


@dataclass
class LoraOptions:
    _argument_group_name = "LoRA"
    lora_r: int = opt("LoRA rank", 16)
    lora_alpha: int = opt("LoRA alpha", 32)
    tune_vision: bool = opt("also put LoRA on the vision tower (frozen by default)", False)


@dataclass
class ScheduleOptions:
    _argument_group_name = "objective and schedule"
    objective: str = opt("what is learned: the price as text, or regression on log price by a head", "text",
                         ["text", "regression"])
    head_learning_rate: float = opt("peak learning rate of the regression head (0: --learning-rate)", 1e-3)
    epochs: float = opt("passes over the train split (ignored if --max-steps > 0)", 1.0)
    max_steps: int = opt("optimizer steps; > 0 overrides --epochs", -1)
    learning_rate: float = opt("peak learning rate", 2e-4)
    lr_scheduler: str = opt("learning-rate schedule", "cosine", ["cosine", "linear", "constant", "constant_with_warmup"])
    global_batch_size: int = opt("samples per optimizer step over all GPUs; 0: 16, or --batch-size x --grad-accum x "
                                 "ranks when both are given", 0)
    seed: int = opt("seed of the LoRA weights and the data order", 42)
    group_by_length: bool = opt("batch samples of similar length: less padding (1.5x on an H200), less mixed batches",
                                True)


@dataclass
class RunOptions:
    _argument_group_name = "evaluation and checkpoints"
    eval_steps: int = opt("validation SMAPE every N steps (0: at the end only)", 50)
    eval_samples: int = opt("validation rows per evaluation", 200)
    save_steps: int = opt("checkpoint every N steps", 100)
    resume: bool = opt("continue from the newest complete checkpoint", True)
    overwrite: bool = opt("train again even if OUTPUT_DIR holds a finished run", False)


@dataclass
class DeviceOptions:
    _argument_group_name = "device and memory (auto: planned from the GPU found; a value given is kept)"
    backend: str = opt("hf (transformers + peft), unsloth, or auto", "auto", ["auto", "hf", "unsloth"])
    base_precision: str = opt("base weights: 16bit, 4bit, or auto", "auto", ["auto", "16bit", "4bit"])
    dtype: str = opt("compute dtype (float16 with loss scaling)", "auto",
                     ["auto", "bfloat16", "float16", "float32"])
    batch_size: int = opt("samples per GPU per micro-step (0: auto)", 0)
    grad_accum: int = opt("micro-steps per optimizer step (0: auto)", 0)
    gradient_checkpointing: str = opt("recompute activations to save memory", "auto", ["auto", "on", "off"])
    max_gpu_memory: float = opt("GiB of GPU memory this process may use (0: the card's)", 0.0)
    workers: int = opt("data loader processes per rank", 2)


@dataclass
class AdvancedOptions:
    _argument_group_name = "advanced: A/B switches and debugging"
    hidden = True
    speedups_off: str = opt("speed levers to turn off, comma-separated (common/speed/__init__.py)", "")
    lora_dropout: float = opt("LoRA dropout", 0.0)
    weight_decay: float = opt("AdamW weight decay", 0.0)
    save_total_limit: int = opt("checkpoints kept", 2)
    logging_steps: int = opt("log the loss every N steps", 10)
    eval_batch_size: int = opt("batch size of the evaluation's generation", 16)
    warmup_ratio: float = opt("share of steps spent warming up", 0.03)
    source: str = opt("shards (stage 5) or jsonl (stage 3, encoded on the fly)", "shards", ["shards", "jsonl"])
    skip_corrupt_shards: bool = opt("skip unreadable shards (logged) instead of failing", False)
    text_only: bool = opt("ablation: drop every image and its tokens", False)
    record_samples: str = opt("write the sample_ids each rank and worker reads to this folder", "")
    group_window: int = opt("batches per length-grouping window", 16)
    shuffle_buffer: int = opt("samples in the shuffle buffer", 1000)
    prefetch_factor: int = opt("batches prefetched per loader worker", 4)
    pin_memory: bool = opt("page-locked host batches (GPU)", True)
    persistent_workers: bool = opt("keep loader workers between evaluations", True)
    min_pixels: int = opt("--source jsonl: fewest pixels per image, as in stages 2 and 4", 256 * 28 * 28)
    max_pixels: int = opt("--source jsonl: most pixels per image, as in stages 2 and 4", 512 * 28 * 28)
    max_length: int = opt("--source jsonl: most tokens per sample", 2048)


@dataclass
class TrainConfig:
    data: DataOptions
    lora: LoraOptions
    schedule: ScheduleOptions
    run: RunOptions
    device: DeviceOptions
    advanced: AdvancedOptions

    def problems(self) -> list[str]:
        from common.model.loading import backend_problem
        from common.model.plan import Device, problems
        from common.speed import lever_problems
        out = [f"--{n.replace('_', '-')} must be >= 1" for group, names in (
            (self.lora, ("lora_r",)), (self.run, ("save_steps",)), (self.advanced, ("logging_steps", "eval_batch_size")),
            (self.advanced, ("group_window",))) for n in names if getattr(group, n) < 1]
        out += [f"--{n.replace('_', '-')} must be >= 0" for group, n in (
            (self.device, "batch_size"), (self.device, "grad_accum"), (self.device, "max_gpu_memory"),
            (self.schedule, "global_batch_size"), (self.run, "eval_steps")) if getattr(group, n) < 0]
        out += problems(self.request(), Device.detect())
        if self.schedule.max_steps <= 0 and self.schedule.epochs <= 0:
            out.append("give --epochs > 0 or --max-steps > 0")
        if not 0 <= self.advanced.warmup_ratio < 1:
            out.append("--warmup-ratio must be in [0, 1)")
        if self.schedule.learning_rate <= 0 or self.schedule.head_learning_rate < 0:
            out.append("--learning-rate must be > 0 and --head-learning-rate >= 0")
        if self.device.workers < 0:
            out.append("--workers must be >= 0")
        out += backend_problem(self.device.backend)
        out += lever_problems(self.advanced.speedups_off)
        out += self.output_problems()
        for split in ("train", "validation"):
            path = (layout.shards_dir(self.data.work_dir, split) / "index.json" if self.advanced.source == "shards"
                    else layout.jsonl_path(self.data.work_dir, split))
            if not path.exists() and not (self.data.shards and self.advanced.source == "shards"):
                out.append(f"{path} not found: run the earlier stages first")
        return out

    def output_problems(self) -> list[str]:
        """A file as the output, or a folder --overwrite / --no-resume would clear that holds more than a run: told
        now, before anything is loaded or deleted."""
        from common.model.checkpoints import COMPLETE, foreign_entries, overwrite_refusal
        out, what = self.out, "--output-dir" if self.data.output_dir else "the output folder"
        if out.exists() and not out.is_dir():
            return [f"{what} {out} is a file, not a folder"]
        finished_and_kept = (out / COMPLETE).exists() and not self.run.overwrite  # main() skips it untouched
        if out.is_dir() and (self.run.overwrite or not self.run.resume) and not finished_and_kept:
            foreign = foreign_entries(out)
            if foreign:
                return [overwrite_refusal(out, foreign, what)]
        return []

    def memory_hint(self) -> str:
        from common.model.loading import gpu_memory_text
        return (f" in stage 6, with {gpu_memory_text()}: pass a smaller --batch-size, --gradient-checkpointing on "
                "or --base-precision 4bit")

    def request(self, tokens: tuple[int, int, int] = (640, 640, 640)):
        """What the user asked of the plan (common.model.plan)."""
        from common.model.plan import Request
        world = int(os.environ.get("WORLD_SIZE", 1))
        d = self.device
        given = self.schedule.global_batch_size or (d.batch_size * d.grad_accum * world if d.batch_size and
                                                     d.grad_accum else 16)
        return Request(d.backend, d.base_precision, d.dtype, d.batch_size, d.grad_accum, d.gradient_checkpointing,
                       d.max_gpu_memory, given, world, *tokens)

    @property
    def out(self) -> Path:
        return Path(self.data.output_dir) if self.data.output_dir else layout.train_output_dir(self.data.work_dir)

    @property
    def encoding(self) -> dict:
        """The image and length settings the samples were encoded with (stage 4's, for shards)."""
        keys = ("min_pixels", "max_pixels", "max_length")
        stage4 = layout.preprocessed_dir(self.data.work_dir, "train") / "stats.json"
        if self.advanced.source == "shards" and stage4.exists():
            return {k: read_json(stage4)["options"][k] for k in keys}
        return {k: getattr(self.advanced, k) for k in keys}


def open_split(cfg: TrainConfig, split: str, spec, model_path: str):
    from common.data.streams import open_stream
    return open_stream(cfg.advanced.source, cfg.data.work_dir, split, spec, model_path, cfg.encoding,
                       training=split == "train", by_rank=split == "train", seed=cfg.schedule.seed,
                       shuffle_buffer=cfg.advanced.shuffle_buffer, shards=cfg.data.shards,
                       skip_corrupt=cfg.advanced.skip_corrupt_shards)


def run_stats(trainer, result, plan, world: int, seconds: float, resume_from, final_eval: dict, in_step) -> dict:
    """stats.json of a finished run: steps, loss, plan, timings, the log, whether the ranks agree."""
    return {"steps": trainer.state.global_step, "train_loss": result.training_loss, "plan": asdict(plan),
            "seconds": round(seconds, 1), "resumed_from": str(resume_from) if resume_from else None,
            "samples_seen": trainer.state.global_step * world * plan.global_batch, "final_eval": final_eval,
            "timing": trainer.timer.summary(plan.global_batch * world), "log_history": trainer.state.log_history,
            "world_size": world, "ranks_hold_same_weights": in_step, "speed_levers": trainer.speed_levers,
            "recompute_batches": trainer.recompute.summary() if trainer.recompute else None}


def main(cfg: TrainConfig) -> dict:
    from common.model.loading import import_backend
    import_backend(cfg.device.backend)  # Unsloth, if chosen, must be imported before transformers
    from common.data.encode import ImageSpec, load_tokenizer
    from common.data.shards import planning_tokens
    from common.model.backoff import train_with_backoff
    from common.model.checkpoints import (clear_run_folder, latest_complete_checkpoint, remove_incomplete_checkpoints,
                                          save_run)
    from common.model.distributed import agreed_checkpoint, init_distributed, output_shared_by_all_nodes
    from common.model.loading import (LoraSettings, bind_local_gpu, cap_gpu_memory, check_model_files,
                                      load_training_model, training_model)
    from common.model.plan import Device, ModelSize, plan_training
    from common.model.training import build_trainer, plan_steps, ranks_hold_same_weights
    from common.speed import Speedups, parse_off
    log = logs.setup("train")
    if (cfg.out / "COMPLETE").exists() and not cfg.run.overwrite:
        log.info("%s holds a finished run; pass --overwrite to train again", cfg.out)
        return read_json(cfg.out / "stats.json")
    world = int(os.environ.get("WORLD_SIZE", 1))
    bind_local_gpu()
    cap_gpu_memory(cfg.device.max_gpu_memory)
    init_distributed()
    shared = output_shared_by_all_nodes(cfg.out)  # else every node keeps its own checkpoints
    writer = logs.rank() == 0 or (not shared and int(os.environ.get("LOCAL_RANK", 0)) == 0)
    model_path = training_model(cfg.data.model, cfg.data.work_dir,
                                cfg.advanced.source == "shards" and not cfg.data.shards)
    check_model_files(model_path)
    tokenizer, spec = load_tokenizer(model_path), ImageSpec.from_model(model_path)
    streams = {split: open_split(cfg, split, spec, model_path) for split in ("train", "validation")}
    # only now that the model and the data have loaded: a bad --model must not cost the previous run
    if writer and (cfg.run.overwrite or not cfg.run.resume):
        clear_run_folder(cfg.out, "--output-dir" if cfg.data.output_dir else "the output folder")
    tokens = planning_tokens(getattr(streams["train"], "index", {}))
    speed = Speedups(cfg.device.backend if cfg.device.backend != "auto" else "hf", parse_off(cfg.advanced.speedups_off))
    plan = plan_training(cfg.request(tokens), Device.detect(), ModelSize.of(model_path), speed.on("compile"))
    logs.every_rank(plan.line(world))
    samples = streams["train"].num_samples
    max_steps = plan_steps(samples, world, plan.micro_batch, plan.grad_accum, cfg.schedule.epochs,
                           cfg.schedule.max_steps)
    log.info("%d train samples, %d per step -> %d steps", samples, plan.global_batch * world, max_steps)
    lora = LoraSettings(cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.advanced.lora_dropout, cfg.lora.tune_vision)
    model, host = load_training_model(model_path, plan, lora, cfg.schedule.seed, parse_off(cfg.advanced.speedups_off))
    trainer = build_trainer(cfg, plan, model, host, tokenizer, spec, streams, max_steps, save_on_each_node=not shared)
    if writer and cfg.out.exists():
        remove_incomplete_checkpoints(cfg.out)
    resume_from = agreed_checkpoint(latest_complete_checkpoint(cfg.out) if cfg.run.resume else None)
    log.info("%s", f"resuming from {resume_from}" if resume_from else "starting fresh")
    started = time.time()
    result, plan = train_with_backoff(trainer, plan, "micro-batch" in plan.chosen and world == 1, resume_from, cfg.out)
    trainer.raise_if_nonfinite(trainer.state.global_step)
    final_eval = trainer.evaluate()
    in_step = ranks_hold_same_weights(trainer.model)
    if in_step is False:
        log.error("the ranks ended with different LoRA weights: DDP did not keep them in step; rank 0's are saved")
    stats = run_stats(trainer, result, plan, world, time.time() - started, resume_from, final_eval, in_step)
    if writer:  # rank 0, and each node's first rank when the nodes do not share OUTPUT_DIR
        save_run(cfg.out, trainer.accelerator.unwrap_model(trainer.model), tokenizer, model_path,
                 {"base_model": model_path, "backend": plan.backend, "objective": cfg.schedule.objective,
                  "plan": asdict(plan), "encoding": cfg.encoding, "options": options.to_jsonable(cfg)}, stats,
                 trainer.head, trainer.price_floor)
        log.info("saved to %s: %s", cfg.out, json.dumps(final_eval))
    return stats


if __name__ == "__main__":
    from common.model.loading import import_unsloth_if_asked
    import_unsloth_if_asked(sys.argv[1:])
    options.run_stage(main, TrainConfig, __doc__)
