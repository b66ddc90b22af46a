"""Training glue over transformers' Trainer: a streaming loader, SMAPE by generation, safe checkpoints.

- Steps are planned from the shard index (epochs x samples / global batch), and the train stream is
  endless, so every rank always has a next batch: no rank can run dry and hang the others.
- Evaluation generates prices on the validation split on rank 0 (the others wait at a barrier) and logs
  SMAPE beside the loss, with the training-median baseline on the same rows.
- A checkpoint counts only once it carries a COMPLETE marker, written after all its files; a NaN or
  infinite loss stops the run before anything is saved.
- With `answer_only_loss` the language-model head runs only where the loss needs it: at positions whose
  next token is learned (the answer and its `<|im_end|>`, a handful per sample) instead of at every one
  of ~600 positions x 151,936 words. The loss is the same sum over the same (position, target) pairs,
  divided by the same token count, so it matches the full-logits loss (tested to float rounding).
"""
from __future__ import annotations

import gc
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.loss.loss_utils import ForCausalLMLoss

from common.model.collate import IGNORE
from common.errors import PipelineError
from common.fsio import write_json
from common.model.metrics import smape
from common.model.predict import predict_batch, with_normalized_pixels

log = logging.getLogger("train")
COMPLETE = "COMPLETE"


class NonFiniteLoss(PipelineError, RuntimeError):
    pass


def plan_steps(num_samples: int, world: int, batch: int, accum: int, epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_samples * epochs / (world * batch * accum)))


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose COMPLETE marker is there and whose files all still are."""
    import json
    for ckpt in sorted(Path(output_dir).glob("checkpoint-*"), key=checkpoint_step, reverse=True):
        marker = ckpt / COMPLETE
        if not marker.exists():
            continue
        missing = [f for f in json.loads(marker.read_text())["files"] if not (ckpt / f).exists()]
        if missing:
            log.warning("%s is missing %s; resuming from an older checkpoint", ckpt, ", ".join(missing))
            continue
        return ckpt
    return None


def remove_incomplete_checkpoints(output_dir: Path) -> list[str]:
    """Folders a kill left mid-save; they would otherwise be overwritten piecemeal or picked up."""
    removed = []
    for p in Path(output_dir).glob("checkpoint-*"):
        if not (p / COMPLETE).exists():
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


ANSWER_POSITIONS = "answer_positions"  # batch key: set by PriceTrainer._prepare_inputs, taken out before the forward


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions (over the whole batch) whose next token carries a label: the logits the loss needs."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)


def answer_only_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss (mean over learned tokens) for logits kept at `positions` only
    (logits[:, j] predicts the token after positions[j])."""
    targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:][:, positions]
    return ForCausalLMLoss(logits, None, logits.shape[-1], shift_labels=targets)


def skip_needless_train_walks(model: torch.nn.Module) -> None:
    """Make `model.train(mode)` return at once when every module is already in that mode.

    The Trainer calls model.train() at the start of every step. On the 3B LoRA model that walks ~3,400 modules
    in Python, which the H100 profile (bench/gpu_runs/h100-s.json) shows as host time with the GPU idle at each
    step's start. A flat read of the modules' flags (a list kept from the last full walk) is ~35x cheaper; any
    module in another mode (after an evaluation, or one switched on its own) takes the full walk."""
    walk = model.train
    modules: list[torch.nn.Module] = []

    def train(mode: bool = True):
        if not modules or any(m.training != mode for m in modules):
            walk(mode)
            modules[:] = list(model.modules())
        return model

    model.train = train


class LengthGroupedStream(torch.utils.data.IterableDataset):
    """Batches of similar length from a sample stream, to cut padding: each window of batch_size x
    window_batches samples is sorted by length, cut into batches, and the batches are yielded in a seeded
    random order, sample by sample, so that a DataLoader with the same batch_size takes them whole (each
    worker's stream is grouped on its own). Every sample still comes exactly once per pass; the order is a
    function of the seed, so a resumed run sees the same batches."""

    def __init__(self, inner, batch_size: int, window_batches: int, seed: int):
        self.inner, self.batch_size, self.window_batches, self.seed = inner, batch_size, window_batches, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        window, size = [], self.batch_size * self.window_batches
        for sample in self.inner:
            window.append(sample)
            if len(window) == size:
                yield from self._grouped(window, rng)
                window = []
        yield from self._grouped(window, rng)

    def _grouped(self, window: list, rng) -> list:
        window = sorted(window, key=lambda s: len(s["input_ids"]))
        batches = [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        rng.shuffle(batches)
        return [s for b in batches for s in b]


class RecordingStream(torch.utils.data.IterableDataset):
    """Writes the sample_id of every sample a rank's worker reads to FOLDER/rank{R}-worker{W}.txt
    (for checking that ranks see disjoint data; prefetched samples are recorded too)."""

    def __init__(self, inner, folder: Path):
        self.inner, self.folder = inner, Path(folder)

    def __iter__(self):
        import os
        info = torch.utils.data.get_worker_info()
        name = f"rank{os.environ.get('RANK', '0')}-worker{info.id if info else 0}.txt"
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / name, "a", encoding="utf-8") as fh:
            for sample in self.inner:
                fh.write(sample["sample_id"] + "\n")
                fh.flush()
                yield sample


class CheckpointMarker(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.exists():
                write_json(ckpt / COMPLETE, {"step": state.global_step,
                                             "files": sorted(p.name for p in ckpt.iterdir())})


class ScheduledGarbageCollection(TrainerCallback):
    """Python's automatic garbage collector off while training; instead the young generations are collected
    every `every` optimizer steps, on every rank at the same step, and everything at evaluations and saves.
    An automatic full collection walks every live object (torch.compile's graphs and guards are hundreds of
    thousands): hundreds of ms at a step nobody chose, with the GPU idle and, under torchrun, every other rank
    waiting for this one in the next all-reduce (torchtitan schedules its collections for the same reason)."""

    def __init__(self, every: int):
        self.every, self.was_enabled = every, True  # as found when training begins

    def on_train_begin(self, args, state, control, **kwargs):
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            gc.collect(1)

    def on_evaluate(self, args, state, control, **kwargs):
        gc.collect()

    def on_save(self, args, state, control, **kwargs):
        gc.collect()

    def on_train_end(self, args, state, control, **kwargs):
        if self.was_enabled:
            gc.enable()


class NonFiniteGuard(TrainerCallback):
    """Checks the loss flag (no per-step GPU sync) before anything is logged, evaluated or saved."""

    def __init__(self, trainer: "PriceTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_log or control.should_evaluate or \
                state.global_step >= state.max_steps:
            self.trainer.raise_if_nonfinite(state.global_step)


def nonfinite_on_any_rank(flag: torch.Tensor | None) -> bool:
    bad = flag.to(torch.int32) if flag is not None else torch.zeros((), dtype=torch.int32)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            bad = bad.cuda()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


def collect_garbage_automatically(_worker_id: int) -> None:
    gc.enable()


def train_loader(dataset, batch_size: int, collate_fn, loader_options: dict) -> DataLoader:
    """The training DataLoader. Its workers collect their own garbage as usual: they start (fork) while
    ScheduledGarbageCollection has the trainer process's collector off, which they would otherwise inherit."""
    workers = loader_options["num_workers"]
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=workers,
                      pin_memory=loader_options["pin_memory"] and torch.cuda.is_available(),
                      persistent_workers=workers > 0 and loader_options["persistent_workers"],
                      prefetch_factor=loader_options["prefetch_factor"] if workers > 0 else None,
                      worker_init_fn=collect_garbage_automatically if workers > 0 else None)


def ranks_hold_same_weights(model: torch.nn.Module) -> bool | None:
    """Whether every rank ends training with the same trainable weights, i.e. DDP kept the ranks in step: each
    rank's per-tensor sums, compared by an all-reduce MIN and MAX (same values in, same kernels: equal bit for bit).
    None outside torchrun."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    sums = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad])
    if dist.get_backend() == "nccl":
        sums = sums.cuda()
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


class EpochBanner(logging.Filter):
    """The Trainer's start-of-training banner with the epochs this run plans: a stream has no length, so the
    Trainer prints "Num Epochs = 9,223,372,036,854,775,807" and one epoch of max_steps."""

    def __init__(self, samples_per_epoch: int, global_batch: int, max_steps: int):
        super().__init__()
        self.samples, self.epochs = samples_per_epoch, max_steps * global_batch / max(1, samples_per_epoch)
        self.steps_per_epoch = samples_per_epoch / global_batch

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        fixed = {"  Num examples =": f"  Num examples = {self.samples:,} per epoch",
                 "  Num Epochs =": f"  Num Epochs = {self.epochs:.2f}",
                 "  Num update steps per epoch =": f"  Num update steps per epoch = {self.steps_per_epoch:.1f}"}
        for start, line in fixed.items():
            if text.startswith(start):
                record.msg, record.args = line, ()
        return True


class PriceTrainer(Trainer):
    def __init__(self, *args, loader_options: dict, eval_options: dict, answer_only: bool = False,
                 pixel_spec=None, no_cache: bool = False, grads_in_buckets: bool = False, cuda_graphs: bool = False,
                 samples_per_epoch: int = 0, **kwargs):
        self.grads_in_buckets = grads_in_buckets  # read while the base class builds its accelerator
        super().__init__(*args, **kwargs)
        self.samples_per_epoch = samples_per_epoch
        skip_needless_train_walks(self.model)
        self.loader_options = loader_options
        self.eval_options = eval_options
        self._nonfinite = None
        self.answer_only = answer_only
        self.pixel_spec = pixel_spec
        # transformers builds a KV cache in every training forward unless told not to: wasted copies, and with
        # compiled decoder layers one recompilation per layer (each guards on its own cache slot)
        self.forward_kwargs = {"use_cache": False} if no_cache else {}
        self._flops_per_token = None
        self.cuda_graphs = cuda_graphs

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Logs with the epoch counted in samples seen (the Trainer, given a stream, counts the run as one)."""
        if self.samples_per_epoch:
            self.state.epoch = self.state.global_step * self.args.world_size * self.args.train_batch_size * \
                self.args.gradient_accumulation_steps / self.samples_per_epoch
        super().log(logs, start_time)

    def _build_accelerator_args(self, **kwargs) -> dict:
        """DDP's options as the Trainer sets them, plus gradient_as_bucket_view, which TrainingArguments lacks."""
        args = super()._build_accelerator_args(**kwargs)
        for handler in args.get("kwargs_handlers", []):
            if isinstance(handler, DistributedDataParallelKwargs):
                handler.gradient_as_bucket_view = self.grads_in_buckets
        return args

    def get_train_dataloader(self) -> DataLoader:
        # The stream splits itself by rank and worker; accelerate must not shard or dispatch it again.
        return train_loader(self.train_dataset, self.args.per_device_train_batch_size, self.data_collator,
                            self.loader_options)

    def _prepare_input(self, data):
        """The Trainer's move to the device, without waiting: a batch the loader pinned is copied asynchronously
        (the Trainer's plain `.to(device)` waited on each of a batch's ~11 tensors: 20 host syncs a step in
        all, profiled on an H100, bench/gpu_runs/h100-r.json)."""
        if isinstance(data, torch.Tensor) and data.device.type == "cpu" and data.is_pinned():
            return data.to(self.args.device, non_blocking=True)
        return super()._prepare_input(data)

    def _prepare_inputs(self, inputs):
        """The answer positions found on the host, from the loader's labels, before the batch moves: found on the
        GPU they are a read-back that waits for the previous step to finish."""
        labels = inputs.get("labels")
        if self.answer_only and labels is not None and labels.device.type == "cpu":
            positions = answer_positions(labels)
            inputs = {**inputs, ANSWER_POSITIONS: positions.pin_memory() if labels.is_pinned() else positions}
        return super()._prepare_inputs(inputs)

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate, 6 x tokens x parameters, with the parameters counted once: the Trainer walks
        every parameter again on every step (profiled: tens of ms per step with the GPU idle)."""
        if self._flops_per_token is None:
            self._flops_per_token = super().floating_point_ops({"input_ids": torch.zeros(1)})
        return self._flops_per_token * inputs["input_ids"].numel() if "input_ids" in inputs else 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**with_normalized_pixels(inputs, self.pixel_spec), **self.forward_kwargs}
        positions = inputs.pop(ANSWER_POSITIONS, None)
        if self.cuda_graphs:
            # a new forward: the graphs' output buffers from the last one (its backward done) may be reused
            torch.compiler.cudagraph_mark_step_begin()
        if self.answer_only and "labels" in inputs:
            # The model's own loss, reduced the same way (a mean per micro-batch: Qwen2.5-VL takes no loss
            # kwargs, so the Trainer then divides by the accumulation steps as it does for that loss).
            if positions is None:
                positions = answer_positions(inputs["labels"])
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=positions)
            loss = answer_only_loss(outputs.logits, inputs["labels"], positions)
            result = (loss, outputs) if return_outputs else loss
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if self._nonfinite is None else (self._nonfinite | bad)
        return result

    def raise_if_nonfinite(self, step: int) -> None:
        """Raise if any rank's loss went non-finite (called on every rank at the same steps: a NaN on one rank
        reaches every rank's weights through the gradient all-reduce, so rank 0 must not save either)."""
        if nonfinite_on_any_rank(self._nonfinite):
            raise NonFiniteLoss(f"the loss became NaN or infinite by step {step}; stopping before saving a broken "
                                "adapter. Lower --learning-rate, check the data, or resume from the last checkpoint.")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = {}
        if self.is_world_process_zero():
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            # generation runs eager: compiled blocks would recompile for the cache, once per layer
            with torch.compiler.set_stance("force_eager"):
                metrics = evaluate_smape(model, **self.eval_options)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
            model.train(was_training)
            self.log(metrics)
            log.info("step %d: %s", self.state.global_step, metrics)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def evaluate_smape(model, tokenizer, dataset, collator, median: float, max_samples: int,
                   batch_size: int, spec=None, host_positions: bool = True) -> dict:
    """SMAPE of generated prices on up to max_samples rows, beside predicting the training median."""
    preds, truths, fallbacks = [], [], 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda s: (collator(s), s))
    for batch, samples in loader:
        for p, s in zip(predict_batch(model, tokenizer, batch, spec=spec, host_positions=host_positions), samples):
            if p is None:
                fallbacks += 1
                p = median
            preds.append(p)
            truths.append(s["price"])
        if len(preds) >= max_samples:
            break
    preds, truths = preds[:max_samples], truths[:max_samples]
    return {"smape": round(smape(preds, truths), 3), "median_smape": round(smape([median] * len(truths), truths), 3),
            "fallbacks": fallbacks, "samples": len(preds),
            "pred_median": float(np.median(preds)) if preds else None}
