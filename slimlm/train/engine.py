"""One training engine for every method: token windows or labeled texts, AdamW, warmup + cosine,
accumulation, clipping, bf16 autocast, gradient checkpointing, evaluation, logging; checkpoints and
resume through train/checkpoint.py.

The engine knows nothing about masks. Methods plug in through `Hooks`; the one attribute it reads is
`Hooks.teacher` (a frozen model that FSDP may shard with the student).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ops import sharded
from ..errors import SlimlmError
from . import budget, checkpoint, distributed
from .datasets import as_dataset, to_device, tokens_in
from .optim import AdamW, parameter_groups


class Hooks:
    """The points where a method changes training. Every hook is optional."""

    teacher = None  # a frozen teacher model the loss uses, if any (FSDP shards it with parallel.shard_teacher)

    def setup(self, trainer: "Trainer") -> None:
        """Change the model (masks, extra parameters) before the optimizer is built."""

    def configure_optimizer(self, optimizer: AdamW) -> None:
        """Register per-parameter optimizer terms (e.g. AST's decay) or groups of the method's own; a group's
        "lr_scale" multiplies the scheduled learning rate (learned movement scores run at 100x)."""

    def before_forward(self, step: int) -> None:
        """Called once per optimizer step, before its first micro-batch."""

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Training loss of one micro-batch and the numbers to log. Default: the task's cross-entropy
        (next token for a causal LM, the label for a classifier)."""
        ce = task_loss(logits_of(model, batch), batch)
        return ce, {"ce": ce.item()}

    def after_backward(self, step: int) -> None:
        """Gradients of the whole step are accumulated, not yet clipped."""

    def after_step(self, step: int) -> dict:
        """After the optimizer step; `step` optimizer steps are done. Returns numbers to log."""
        return {}

    def export(self, model) -> dict:
        """Turn the trained model into what is published; returns extras for the report."""
        return {}


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def logits_of(model, batch: dict) -> torch.Tensor:
    if "labels" in batch:  # classifier: one distribution per example
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return model(input_ids=batch["input_ids"], use_cache=False).logits


def task_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    if "labels" in batch:
        return F.cross_entropy(logits.float(), batch["labels"])
    return causal_lm_loss(logits, batch["input_ids"])


def predicted(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The distributions a loss compares: every position but the last for a causal LM (it has no
    target), the single class distribution for a classifier."""
    return logits if "labels" in batch else logits[:, :-1]


class Trainer:
    def __init__(self, model, hooks: Hooks, recipe: dict, train, valid, run_dir: Path):
        """`train`/`valid`: token streams (packed into windows of data.seqlen), labeled examples, or
        datasets from datasets.py; `valid` may be None."""
        self.model, self.hooks, self.recipe = model, hooks, recipe
        self.cfg = recipe["train"]
        self.seqlen = recipe["data"]["seqlen"]
        self.train_set = as_dataset(train, self.seqlen)
        if len(self.train_set) < self.cfg["batch_size"]:
            raise SlimlmError(f"training data '{self.train_set.source}' has {len(self.train_set)} examples "
                              f"(windows of {self.seqlen} tokens for text), fewer than one batch of {self.cfg['batch_size']}")
        self.valid = as_dataset(valid, self.seqlen) if valid is not None else None
        self.run_dir = Path(run_dir)
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict] = []
        self.device = next(model.parameters()).device
        self.bf16 = budget.use_bf16(self.cfg["bf16"], self.device)  # before setup: a teacher follows it
        torch.manual_seed(recipe["seed"])
        hooks.setup(self)  # identical on every rank: same seed, same model
        rank = distributed.world()[0]
        if rank:  # dropout: each rank draws its own masks for its own examples (rank 0 as one process would)
            torch.manual_seed(recipe["seed"] + 1_000_003 * rank)
        if self.cfg["grad_checkpointing"]:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # under torchrun: FSDP2 replaces the parameters by shards, so it comes before the optimizer
        self.fsdp = distributed.uses_fsdp(recipe["parallel"])
        if self.fsdp:
            self.skeleton = distributed.fully_shard_model(model, recipe["parallel"], str(self.device))
            teacher = getattr(hooks, "teacher", None)
            if teacher is not None and recipe["parallel"]["shard_teacher"] and not distributed.is_fully_sharded(teacher):
                distributed.fully_shard_model(teacher, recipe["parallel"], str(self.device))
            self.forward_model = model
        else:
            self.forward_model = distributed.wrap(model)  # DDP under torchrun, the model itself otherwise
        self.optimizer = AdamW(parameter_groups(model, self.cfg["weight_decay"]), lr=self.cfg["lr"],
                               betas=self.cfg["betas"], eps=self.cfg["eps"])
        hooks.configure_optimizer(self.optimizer)
        self.writer = self._tensorboard() if self.cfg["tensorboard"] and distributed.is_main() else None

    # -- data: batch i is a pure function of (seed, i), so resuming needs only the step ------------
    def batch(self, index: int) -> dict:
        bs, n = self.cfg["batch_size"], len(self.train_set)
        ids = []
        for j in range(index * bs, (index + 1) * bs):
            epoch, pos = divmod(j, n)
            ids.append(int(self._epoch_order(epoch)[pos]))
        return to_device(self.train_set.get(distributed.rank_share(ids, bs)), self.device)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The shuffled example order of one epoch, computed once per epoch."""
        if getattr(self, "_order_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.recipe["seed"] * 1_000_003 + epoch)
            self._order, self._order_epoch = torch.randperm(len(self.train_set), generator=g), epoch
        return self._order

    # -- the loop ----------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> list[dict]:
        """Train to the recipe's last step (or stop early after step `until`, as an interruption would)."""
        cfg, total = self.cfg, self.cfg["steps"]
        stop = min(total, until) if until else total
        self.model.train()
        bar = tqdm(total=total, initial=self.step, desc="training", unit="step", disable=not distributed.is_main())
        run_tokens, run_seconds = 0, 0.0  # the bar's tokens/s: the mean over this run's steps, not the last one
        while self.step < stop:
            start = time.perf_counter()
            lr = budget.lr_at(cfg, self.step)
            for group in self.optimizer.param_groups:  # a method's own group may run at a multiple (lr_scale)
                group["lr"] = lr * group.get("lr_scale", 1.0)
            self.hooks.before_forward(self.step)
            sums: dict[str, float] = {}
            step_tokens = 0
            for micro in range(cfg["grad_accum"]):
                batch = self.batch(self.step * cfg["grad_accum"] + micro)
                step_tokens += tokens_in(batch)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, parts = self.hooks.loss(self.forward_model, batch)
                if not math.isfinite(loss.item()):
                    raise self.diverged(f"the loss became {loss.item()}")
                (loss / cfg["grad_accum"]).backward()
                for k, v in {"loss": loss.item(), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v / cfg["grad_accum"]
            sums = distributed.mean_over_ranks(sums)
            step_tokens = distributed.sum_over_ranks(step_tokens)
            self.hooks.after_backward(self.step)
            grad_norm = sharded.full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"] or float("inf")))
            if not math.isfinite(float(grad_norm)):  # a finite loss can still have NaN gradients: never step on them
                raise self.diverged(f"the gradients became {float(grad_norm)} (the loss was finite)")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens_seen += step_tokens
            method_record = self.hooks.after_step(self.step)  # a mask refresh is part of the step's cost
            seconds = time.perf_counter() - start
            run_tokens, run_seconds = run_tokens + step_tokens, run_seconds + seconds
            record = {"step": self.step, **sums, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens": self.tokens_seen, "tokens_per_s": step_tokens / seconds,
                      "step_seconds": seconds, **method_record}
            evaluating = self.valid is not None and (self.step % cfg["eval_every"] == 0 or self.step == total)
            saving = self.step % cfg["save_every"] == 0 and self.step < total
            if evaluating and (distributed.is_main() or self.fsdp):  # a sharded forward needs every rank
                record[self.valid.metric] = self.evaluate()
                if distributed.is_main():
                    bar.write(f"step {self.step}: {self.valid.metric} {record[self.valid.metric]:.4f}")
            self.log(record)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{run_tokens / run_seconds:.0f}")
            bar.update(1)
            if saving:
                self.check_finite()  # a checkpoint is named as good only if it is
                self.save_checkpoint()
            if evaluating or saving:
                distributed.barrier()  # rank 0 may have evaluated or saved alone: step on together
        bar.close()
        if self.writer:
            self.writer.close()
        self.check_finite()  # nothing non-finite is published either
        return self.history

    def check_finite(self) -> None:
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(sharded.local(p.detach())).all()):
                raise self.diverged(f"parameter {name} became NaN or infinite")

    def diverged(self, what: str) -> SlimlmError:
        """The divergence error, with advice that a resume accepts: the last checkpoint (every saved one was
        checked finite) and a lower train.lr (the one recipe key a resume may change)."""
        ckpt, lr = self.last_checkpoint(), self.cfg["lr"]
        how = (f"resume from it with a lower learning rate: --resume {ckpt} train.lr={lr / 10:g} (with the run's "
               "other overrides)" if ckpt else
               f"no checkpoint was saved before it: start over with --overwrite and a lower train.lr (e.g. {lr / 10:g})")
        return SlimlmError(f"training diverged at step {self.step + 1}: {what}; the last good checkpoint is "
                           f"{ckpt or 'none'}: {how}")

    def unsharded_model(self, everywhere: bool = False):
        """The trained model as one plain module: the model itself, or under FSDP its shards gathered
        into a copy (on every rank when `everywhere`, else on rank 0 and None on the others)."""
        if not self.fsdp:
            return self.model
        return distributed.gather_full_model(self.model, self.skeleton, everywhere)

    def evaluate(self) -> float:
        """Validation perplexity (text) or accuracy (labeled examples)."""
        value = self.valid.score(self.model, self.recipe["data"]["eval_windows"])
        self.model.train()
        return value

    def log(self, record: dict) -> None:
        self.history.append(record)
        if not distributed.is_main():
            return
        if self.step % self.cfg["log_every"] == 0 or any(k.startswith("val_") for k in record):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.writer.add_scalar(k, v, self.step)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SlimlmError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # -- checkpoints (train/checkpoint.py) ---------------------------------------------------------
    def last_checkpoint(self) -> str | None:
        return checkpoint.last(self.run_dir)

    def save_checkpoint(self) -> Path:
        return checkpoint.save(self)

    def load_checkpoint(self, folder: str) -> None:
        checkpoint.load(self, folder)
