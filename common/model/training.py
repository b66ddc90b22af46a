"""Training glue over transformers' Trainer: a streaming loader, SMAPE by generation, a NaN guard.

- Steps are planned from the shard index (epochs x samples / global batch), and the train stream is endless,
  so every rank always has a next batch: no rank can run dry and hang the others.
- Evaluation generates prices on the validation split on rank 0 (the others wait at a barrier) and logs SMAPE
  beside the loss, with the training-median baseline on the same rows.
- A NaN or infinite loss on any rank stops the run before anything is saved.
"""
from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainingArguments

from common.errors import PipelineError
from common.model.head import LAST_POSITIONS, PRICE_TARGETS, pooled, regression_loss
from common.model.metrics import smape
from common.model.predict import predict_batch, with_normalized_pixels
from common.speed.answer_logits import ANSWER_POSITIONS, answer_only_loss, answer_positions
from common.speed.trainer import FastTrainer

log = logging.getLogger("train")


class NonFiniteLoss(PipelineError, RuntimeError):
    pass


def plan_steps(num_samples: int, world: int, batch: int, accum: int, epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_samples * epochs / (world * batch * accum)))


def training_arguments(output_dir, *, batch_size: int, grad_accum: int, dtype: str, learning_rate: float,
                       lr_scheduler: str, warmup_ratio: float, weight_decay: float, max_steps: int, logging_steps: int,
                       save_steps: int, save_total_limit: int, eval_steps: int, seed: int,
                       save_on_each_node: bool = False) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate, lr_scheduler_type=lr_scheduler, warmup_steps=int(warmup_ratio * max_steps),
        weight_decay=weight_decay, max_steps=max_steps, logging_steps=logging_steps, save_strategy="steps",
        save_steps=save_steps, save_total_limit=save_total_limit, save_on_each_node=save_on_each_node,
        eval_strategy="steps" if eval_steps > 0 else "no", eval_steps=eval_steps or None,
        bf16=cuda and dtype == "bfloat16", fp16=cuda and dtype == "float16", tf32=cuda, use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
        report_to=["tensorboard"], seed=seed, remove_unused_columns=False, label_names=["labels"],
        ddp_backend=("nccl" if cuda else "gloo") if distributed else None, ddp_find_unused_parameters=False,
        # Qwen2.5-VL's only buffers are its rotary frequencies, built the same on every rank: broadcasting them
        # before each forward is a collective a step that makes each rank wait for the other
        ddp_broadcast_buffers=False,
        logging_nan_inf_filter=False,  # its per-step isnan() check stalls the GPU; NonFiniteGuard stops on NaN instead
        accelerator_config={"dispatch_batches": False, "split_batches": False},
        gradient_checkpointing=False,  # set up by common.model.loading, with the frozen-vision fix
        disable_tqdm=False, log_level="info", log_level_replica="warning")


def train_loader(dataset, batch_size: int, collate_fn, loader_options: dict) -> DataLoader:
    workers = loader_options["num_workers"]
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=workers,
                      pin_memory=loader_options["pin_memory"] and torch.cuda.is_available(),
                      persistent_workers=workers > 0 and loader_options["persistent_workers"],
                      prefetch_factor=loader_options["prefetch_factor"] if workers > 0 else None)


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


def compilations() -> int:
    """Frames torch.compile has compiled in this process so far (dynamo's own counter: torch._dynamo.reset keeps it)."""
    from torch._dynamo.utils import counters
    return counters["frames"]["total"]


class StepTimer(TrainerCallback):
    """Wall time of the optimizer steps for stats.json: the first step (it compiles) apart; the steady rate over the
    steps after the `warmup`-th, the GPU synchronized at the window's two ends only, leaving out the steps during
    which torch.compile compiled (listed apart with their seconds: a recompilation costs 10-30 s once on the 3B,
    e.g. for the first length that is not a multiple of 8); the rate at the median step;
    and the slowest steps after the warmup with their numbers."""

    def __init__(self, warmup: int = 3):
        self.warmup, self.first_step_s, self.marks, self.timed = warmup, None, [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin_step, self.started, self.first_step_s = state.global_step, time.perf_counter(), None
        self.marks, self.timed, self.last = [], [], None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        done, now = state.global_step - self.begin_step, time.perf_counter()
        if done == 1:
            self.first_step_s = now - self.started
        if done == self.warmup or state.global_step == state.max_steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                now = time.perf_counter()
            self.marks.append((state.global_step, now))
        if done >= self.warmup:
            compiled = compilations()
            if self.last is not None:  # (step, its seconds, whether it compiled)
                self.timed.append((state.global_step, now - self.last[0], compiled != self.last[1]))
            self.last = (now, compiled)

    def summary(self, samples_per_step: int) -> dict:
        out = {"first_step_s": round(self.first_step_s, 2) if self.first_step_s else None}
        compiling = [(step, s) for step, s, compiled in self.timed if compiled]
        if len(self.marks) == 2:
            (step0, t0), (step1, t1) = self.marks
            steps, seconds = step1 - step0 - len(compiling), t1 - t0 - sum(s for _, s in compiling)
            out.update(steady_steps=steps, compile_steps=[[step, round(s, 2)] for step, s in compiling])
            if steps > 0 and seconds > 0:
                out["steady_samples_per_s"] = round(steps * samples_per_step / seconds, 2)
        if len(self.timed) > 1:
            intervals = sorted(s for _, s, _ in self.timed)
            median = intervals[len(intervals) // 2]
            out.update(median_step_s=round(median, 4), median_samples_per_s=round(samples_per_step / median, 2),
                       slow_steps=sum(1 for i in intervals if i > 5 * median))
            slowest = sorted(self.timed, key=lambda t: -t[1])[:3]
            out["slowest_steps"] = [[step, round(s, 2)] for step, s, _ in slowest]
        if torch.cuda.is_available():
            out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return out


class PriceTrainer(FastTrainer):
    def __init__(self, *args, loader_options: dict, eval_options: dict, pixel_spec=None, no_cache: bool = False,
                 samples_per_epoch: int = 0, head=None, head_learning_rate: float = 0.0, price_floor: float = 0.01,
                 recompute=None, **kwargs):
        super().__init__(*args, **kwargs)
        # the regression objective's price head, and the lowest price it may predict (saved with it)
        self.head, self.head_learning_rate, self.price_floor = head, head_learning_rate, price_floor
        # the loss is a sum over the global batch's answer tokens divided by their count (num_items_in_batch), so
        # any split into micro-batches, accumulation steps and ranks learns the same (the Trainer then does not
        # divide by the accumulation steps)
        self.model_accepts_loss_kwargs = True
        self.timer = StepTimer()
        self.add_callback(self.timer)
        self.loader_options = loader_options
        self.eval_options = eval_options
        self.samples_per_epoch = samples_per_epoch
        self.pixel_spec = pixel_spec
        self._nonfinite = None
        self.recompute = recompute  # common.model.recompute: the level set per micro-batch, or None
        # transformers builds a KV cache in every training forward unless told not to: wasted copies, and with
        # compiled decoder layers one recompilation per layer (each guards on its own cache slot)
        self.forward_kwargs = {"use_cache": False} if no_cache else {}

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Logs with the epoch counted in samples seen (the Trainer, given a stream, counts the run as one)."""
        if self.samples_per_epoch:
            self.state.epoch = self.state.global_step * self.args.world_size * self.args.train_batch_size * \
                self.args.gradient_accumulation_steps / self.samples_per_epoch
        super().log(logs, start_time)

    def get_train_dataloader(self) -> DataLoader:
        # The stream splits itself by rank and worker; accelerate must not shard or dispatch it again.
        return train_loader(self.train_dataset, self.args.per_device_train_batch_size, self.data_collator,
                            self.loader_options)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the price head in a group of its own at --head-learning-rate."""
        if self.optimizer is None and self.head is not None and self.head_learning_rate:
            opt_model = self.model if model is None else model
            head = {id(p) for p in self.head.parameters()}
            rest = [p for p in opt_model.parameters() if p.requires_grad and id(p) not in head]
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls([{"params": rest, "weight_decay": self.args.weight_decay},
                                            {"params": list(self.head.parameters()), "weight_decay": 0.0,
                                             "lr": self.head_learning_rate}], **kwargs)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**with_normalized_pixels(inputs, self.pixel_spec), **self.forward_kwargs}
        positions = inputs.pop(ANSWER_POSITIONS, None)
        if self.recompute is not None and model.training:
            self.recompute.for_batch(inputs["input_ids"])
        if self.head is not None:  # regression on log price from the last prompt token's final hidden state
            last, prices = inputs.pop(LAST_POSITIONS), inputs.pop(PRICE_TARGETS)
            outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
            loss = regression_loss(self.head(pooled(outputs.hidden_states[-1], last)), prices)
            result = (loss, outputs) if return_outputs else loss
        elif self.answer_only and "labels" in inputs:
            if positions is None:
                positions = answer_positions(inputs["labels"])
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=positions)
            loss = answer_only_loss(outputs.logits, inputs["labels"], positions, num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages over ranks; the count spans them all
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
                metrics = evaluate_smape(model, **self.eval_options, head=self.head)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
            model.train(was_training)
            self.log(metrics)
            log.info("step %d: %s", self.state.global_step, metrics)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def evaluate_smape(model, tokenizer, dataset, collator, median: float, max_samples: int,
                   batch_size: int, spec=None, head=None, price_floor: float = 0.01) -> dict:
    """SMAPE of predicted prices on up to max_samples rows, beside predicting the training median: generated as
    text, or from the price head when there is one."""
    from common.model.inference import regression_predictor
    predict = regression_predictor(model, head, price_floor, spec) if head is not None else \
        (lambda batch: predict_batch(model, tokenizer, batch, spec=spec))
    preds, truths, fallbacks = [], [], 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda s: (collator(s), s))
    for batch, samples in loader:
        for p, s in zip(predict(batch), samples):
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


def build_trainer(cfg, plan, model, host_ids, tokenizer, spec, streams: dict, max_steps: int,
                  save_on_each_node: bool = False) -> PriceTrainer:
    """The Trainer for stage 6's config: streaming loader, collators (host-built ids when `host_ids`), SMAPE
    evaluation on the validation stream, checkpoint markers and the NaN guard."""
    from common import layout
    from common.data.streams import LengthGroupedStream, RecordingStream
    from common.fsio import read_json
    from common.model.checkpoints import CheckpointMarker
    from common.model.collate import for_tokenizer
    from common.model.recompute import Recompute
    from common.speed import Speedups, parse_off
    speed = Speedups(plan.backend, parse_off(cfg.advanced.speedups_off))
    train, grouping = streams["train"], None
    if cfg.advanced.record_samples:
        train = RecordingStream(train, cfg.advanced.record_samples)
    if cfg.schedule.group_by_length:
        train = grouping = LengthGroupedStream(train, plan.micro_batch, cfg.advanced.group_window, cfg.schedule.seed)
    median = read_json(layout.jsonl_dir(cfg.data.work_dir) / "stats.json")["train_median_price"]
    text_only, regression = cfg.advanced.text_only, cfg.schedule.objective == "regression"
    head, floor = None, 0.01
    if regression:
        from common.data.chat_jsonl import train_prices
        from common.model.head import attach_head
        prices = train_prices(cfg.data.work_dir)
        head, floor = attach_head(model, prices["mean_log1p"]), prices["min"]
    eval_options = {"tokenizer": tokenizer, "dataset": streams["validation"], "median": median, "spec": spec,
                    "max_samples": cfg.run.eval_samples, "batch_size": cfg.advanced.eval_batch_size, "price_floor": floor,
                    "collator": for_tokenizer(tokenizer, "left", with_labels=False, drop_images=text_only,
                                              host_ids=host_ids, pooled=regression)}
    args = training_arguments(cfg.out, batch_size=plan.micro_batch, grad_accum=plan.grad_accum, dtype=plan.dtype,
                              learning_rate=cfg.schedule.learning_rate, lr_scheduler=cfg.schedule.lr_scheduler,
                              warmup_ratio=cfg.advanced.warmup_ratio, weight_decay=cfg.advanced.weight_decay,
                              max_steps=max_steps, logging_steps=cfg.advanced.logging_steps, save_steps=cfg.run.save_steps,
                              save_total_limit=cfg.advanced.save_total_limit, eval_steps=cfg.run.eval_steps,
                              seed=cfg.schedule.seed, save_on_each_node=save_on_each_node)
    loader = {"num_workers": cfg.device.workers, "pin_memory": cfg.advanced.pin_memory,
              "persistent_workers": cfg.advanced.persistent_workers, "prefetch_factor": cfg.advanced.prefetch_factor}
    trainer = PriceTrainer(model=model, args=args, train_dataset=train, eval_dataset=streams["validation"],
                           data_collator=for_tokenizer(tokenizer, drop_images=text_only, host_ids=host_ids,
                                                       pooled=regression),
                           loader_options=loader, eval_options=eval_options, pixel_spec=spec,
                           glue=speed.on("trainer_glue"), answer_only=speed.on("answer_only_logits"),
                           no_cache=plan.backend == "hf", samples_per_epoch=streams["train"].num_samples,
                           head=head, head_learning_rate=cfg.schedule.head_learning_rate, price_floor=floor,
                           recompute=Recompute(plan, model, cfg.lora.tune_vision) if plan.recompute_limits else None,
                           callbacks=[CheckpointMarker(head, floor)])
    trainer.add_callback(NonFiniteGuard(trainer))
    if speed.on("compile") or plan.backend == "unsloth":  # Unsloth compiles its decoder layers itself
        from common.speed.compile import KeepThreadCount
        trainer.add_callback(KeepThreadCount())
    trainer.speed_levers = speed.active()
    trainer.grouping = grouping  # its batch size follows the micro-batch if the backoff shrinks it
    logging.getLogger("transformers.trainer").addFilter(
        EpochBanner(streams["train"].num_samples, 
                    args.world_size * args.train_batch_size * args.gradient_accumulation_steps,
                    max_steps))
    return trainer
