"""One training engine for every method: token windows or labeled texts, AdamW, warmup + cosine,
accumulation, clipping, bf16 autocast, gradient checkpointing, evaluation, checkpoints, resume, logging.

The engine knows nothing about masks or teachers. Methods plug in through `Hooks`.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from .. import recipe as recipes
from .. import sharded
from ..errors import SlimlmError
from . import distributed
from .datasets import as_dataset, to_device, tokens_in
from . import budget
from .optim import AdamW, parameter_groups


class Hooks:
    """The points where a method changes training. Every hook is optional."""

    def setup(self, trainer: "Trainer") -> None:
        """Change the model (masks, extra parameters) before the optimizer is built."""

    def configure_optimizer(self, optimizer: AdamW) -> None:
        """Register per-parameter optimizer terms (e.g. AST's decay)."""

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
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.hooks.before_forward(self.step)
            sums: dict[str, float] = {}
            step_tokens = 0
            for micro in range(cfg["grad_accum"]):
                batch = self.batch(self.step * cfg["grad_accum"] + micro)
                step_tokens += tokens_in(batch)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, parts = self.hooks.loss(self.forward_model, batch)
                if not math.isfinite(loss.item()):
                    raise SlimlmError(f"loss diverged ({loss.item()}) at step {self.step + 1}; the last good "
                                      f"checkpoint is {self.last_checkpoint() or 'none'}: lower train.lr or "
                                      "raise train.warmup_steps and resume from it")
                (loss / cfg["grad_accum"]).backward()
                for k, v in {"loss": loss.item(), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v / cfg["grad_accum"]
            sums = distributed.mean_over_ranks(sums)
            step_tokens = distributed.sum_over_ranks(step_tokens)
            self.hooks.after_backward(self.step)
            grad_norm = sharded.full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"] or float("inf")))
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
                self.save_checkpoint()
            if evaluating or saving:
                distributed.barrier()  # rank 0 may have evaluated or saved alone: step on together
        bar.close()
        if self.writer:
            self.writer.close()
        return self.history

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

    # -- checkpoints -------------------------------------------------------------------------------
    def last_checkpoint(self) -> str | None:
        found = sorted(self.run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return str(found[-1]) if found else None

    def save_checkpoint(self) -> Path:
        """One process or DDP: rank 0 writes the full state (every rank holds the same) in safetensors.
        FSDP: every rank writes its own shards with torch.distributed.checkpoint (DCP). Either kind
        resumes on any number of processes (DCP reshards on load)."""
        final = self.run_dir / f"checkpoint-{self.step}"
        tmp = self.run_dir / f".checkpoint-{self.step}.tmp"
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.fsdp:
            distributed.barrier()  # the folder exists before any rank writes into it
            self._save_shards(tmp)
            distributed.barrier()  # every rank has written before rank 0 renames
        if not distributed.is_main():
            return final
        if not self.fsdp:
            self._save_full(tmp)
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "recipe": self.recipe,
                 "format": "dcp" if self.fsdp else "safetensors"}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kept = sorted(self.run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in kept[: -self.cfg["keep_checkpoints"]]:
            shutil.rmtree(old)
        return final

    def _save_full(self, folder: Path) -> None:
        save_model(self.model, str(folder / "model.safetensors"))
        tensors = {"rng.torch": torch.get_rng_state()}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"optim.{i}.{key}"] = value.contiguous()
        save_file(tensors, str(folder / "trainer.safetensors"))

    def _save_shards(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}, checkpoint_id=str(folder))

    def load_checkpoint(self, folder: str) -> None:
        path = Path(folder)
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise SlimlmError(f"{folder} is not a slimlm checkpoint (no trainer_state.json)")
        state = json.loads(state_file.read_text())
        diff = recipes.differences(state["recipe"], self.recipe)
        if diff:
            raise SlimlmError(f"checkpoint {folder} was made with a different recipe ({', '.join(diff)} differ): "
                              "resume with the recipe and overrides of the original run")
        if state.get("format") == "dcp":
            self._load_shards(path)
        else:
            self._load_full(path)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        rank = distributed.world()[0]
        if rank:  # the saved RNG state is rank 0's: the other ranks draw their own dropout again
            torch.manual_seed(self.recipe["seed"] + 1_000_003 * rank + self.step)

    def _load_full_into_shards(self, file: Path) -> tuple[list[str], list[str]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # safetensors stores tied weights (embeddings / LM head) once, under either name
        owner = distributed.shared_parameters(self.model)
        names = set(self.model.state_dict())
        full = {owner.get(k, k): v for k, v in load_file(str(file)).items()}
        missing = sorted({owner.get(n, n) for n in names} - set(full))
        unexpected = sorted(set(full) - names)
        if not (missing or unexpected):
            set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        return missing, unexpected

    def _load_shards(self, path: Path) -> None:
        """A DCP checkpoint into this run's model and optimizer, sharded or not, on any process count."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
        try:
            with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(state, checkpoint_id=str(path))
        except Exception as err:  # DCP wraps every rank's failure; its last line names the cause
            raise SlimlmError(f"checkpoint {path} does not match the model: {str(err).strip().splitlines()[-1]}") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        torch.set_rng_state(state["rng"])

    def _load_full(self, path: Path) -> None:
        """A full-state (one process / DDP) checkpoint; under FSDP every rank keeps its own rows of it."""
        if self.fsdp:
            missing, unexpected = self._load_full_into_shards(path / "model.safetensors")
        else:
            missing, unexpected = load_model(self.model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise SlimlmError(f"checkpoint {path} does not match the model: "
                              f"{(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}")
        tensors = load_file(str(path / "trainer.safetensors"))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]  # the order of model.parameters()
        for i, p in enumerate(params):
            entries = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
            if entries:
                self.optimizer.state[p] = {k: sharded.shard_like(v.to(p.device), p).clone() if k != "step" else v
                                           for k, v in entries.items()}
        torch.set_rng_state(tensors["rng.torch"])
