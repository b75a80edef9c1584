"""N:M sparse training (AST, and its baselines naive and gmp) inside a stock `transformers.Trainer`.

`prepare` builds everything the Trainer needs from a slimlm recipe; the Trainer itself is not subclassed:

    parts = slimlm.hf.prepare("ast", model, tokenizer, ["data.train=corpus.txt", "train.steps=200"])
    trainer = transformers.Trainer(model=model, args=parts.training_args("run"), train_dataset=parts.train_dataset(),
                                   optimizers=parts.optimizers, compute_loss_func=parts.compute_loss,
                                   callbacks=[parts.callback], processing_class=tokenizer)
    trainer.train()           # checkpoints hold the masks; resume with trainer.train(resume_from_checkpoint=...)
    parts.save("ast-2of4")    # the masks baked in: a plain checkpoint, valid 2:4

What runs where (slimlm's engine hooks, `slimlm/train/engine.py`, mapped onto the Trainer's):
- `setup` (one-shot first mask, masks as parametrizations, the frozen teacher) runs in `prepare`, on the
  model's current device, before the optimizer exists (as in the engine);
- the optimizer is slimlm's AdamW with the method's decay of pruned weights registered, and the scheduler
  is slimlm's warm-up + cosine (`budget.lr_at`) as a LambdaLR: `Trainer(optimizers=parts.optimizers)`;
- the loss is the method's (distillation from the teacher: alpha * T^2 * KL + (1 - alpha) * CE), given to
  the Trainer as `compute_loss_func`; the teacher reads the student's inputs, recorded by a forward
  pre-hook on the model;
- `before_forward` runs in `on_step_begin`, `after_backward` in `on_pre_optimizer_step` (the Trainer has
  clipped the gradients by then: no hook point sits between backward and clipping), `after_step` (mask
  refresh) in `on_step_end`; its numbers and the loss parts (ce, kl) join the Trainer's logs;
- `export` (masks baked: m * W with exact zeros) runs in `on_train_end` once the last step is done.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import TrainerCallback

from . import methods, models
from . import recipe as recipes
from .data import load_tokens, options
from .errors import SlimlmError
from .methods.ast import ONE_SHOT, SparseTraining
from .ops.sparsity import is_valid_nm
from .train import budget
from .train.datasets import as_dataset
from .train.distill import kd_loss
from .train.optim import AdamW, parameter_groups


class _EngineView:
    """What a method's `setup` reads from slimlm's engine: the model and whether training runs in bf16."""

    def __init__(self, model, recipe: dict):
        self.model, self.recipe = model, recipe
        self.device = next(model.parameters()).device
        self.bf16 = budget.use_bf16(recipe["train"]["bf16"], self.device)


def prepare(recipe: str | dict, model, tokenizer, overrides: list[str] | None = None) -> "TrainerParts":
    """Attach the recipe's method to `model` (in place) and build the Trainer's parts.

    `recipe`: a built-in recipe name (`ast`, `naive`, `gmp`), a YAML file, or a recipe dict from
    `slimlm.recipe.resolve`; `overrides`: `key.sub=value` items as on the command line. The recipe's
    `train.*` settings (steps, lr schedule, batch size, clipping) define the run: `training_args` turns them
    into TrainingArguments. Put the model on its device first (the teacher is made there)."""
    if isinstance(recipe, dict):
        if overrides:
            raise SlimlmError("prepare: give overrides with a recipe name or file, not with a resolved recipe dict")
    else:
        recipe = recipes.resolve(recipe, overrides)
    return TrainerParts(recipe, model, tokenizer)


class TrainerParts:
    """The method, optimizer, scheduler, loss, callback and data of one sparse-training run in a Trainer."""

    def __init__(self, recipe: dict, model, tokenizer):
        cfg = recipe["method"]
        method_class = methods.get(cfg["name"])
        if not issubclass(method_class, SparseTraining):
            raise SlimlmError(f"method '{cfg['name']}' does not run inside a transformers.Trainer: the integration "
                              "covers N:M sparse training of causal LMs (ast, naive, gmp); use `slimlm train`")
        if cfg["slorb"]["enabled"]:
            raise SlimlmError("method.slorb.enabled: SLoRB side paths are not covered by the Trainer integration "
                              "(their export lives beside the checkpoint): use `slimlm train`")
        if cfg["init"] in ONE_SHOT and not (cfg["calib"] or recipe["data"]["train"]):
            raise SlimlmError(f"method.init={cfg['init']} calibrates on text: set data.train=FILE (or method.calib=FILE), "
                              "or method.init=magnitude")
        if not recipe["train"]["lr"] > 0:
            raise SlimlmError("train.lr must be positive")
        self.recipe, self.model, self.tokenizer = recipe, model, tokenizer
        view = _EngineView(model, recipe)
        self.bf16 = view.bf16
        self.method = method_class(recipe, tokenizer)
        torch.manual_seed(recipe["seed"])  # as the engine: the same seed before setup
        self.method.setup(view)
        t = recipe["train"]
        self.optimizer = AdamW(parameter_groups(model, t["weight_decay"]), lr=t["lr"], betas=t["betas"], eps=t["eps"])
        self.method.configure_optimizer(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(t))
        self.optimizers = (self.optimizer, self.scheduler)
        self.callback = SparseTrainingCallback(self)
        self.exported: dict | None = None
        self._inputs: dict = {}
        self._parts: dict[str, float] = {}  # ce, kl of the current optimizer step
        self._accum = t["grad_accum"]
        self._hook = model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)

    # -- Trainer arguments ---------------------------------------------------------------------------
    def training_args(self, output_dir: str, **overrides):
        """TrainingArguments that match the recipe's `train.*` settings (any may be overridden, but the
        step count must stay: the mask refreshes, decay ramp and lr schedule are laid out for it)."""
        import transformers

        t = self.recipe["train"]
        kwargs = dict(output_dir=str(output_dir), max_steps=t["steps"], per_device_train_batch_size=t["batch_size"],
                      gradient_accumulation_steps=t["grad_accum"], learning_rate=t["lr"],
                      max_grad_norm=t["grad_clip"] or 0.0, logging_steps=t["log_every"], save_steps=t["save_every"],
                      save_total_limit=t["keep_checkpoints"], seed=self.recipe["seed"], bf16=self.bf16,
                      dataloader_num_workers=0, remove_unused_columns=False, report_to="none",
                      use_cpu=next(self.model.parameters()).device.type == "cpu")
        kwargs.update(overrides)
        return transformers.TrainingArguments(**kwargs)

    def train_dataset(self, text: str | None = None) -> "EngineOrder":
        """The recipe's training text (or `text`: a file or dataset spec) as packed windows of data.seqlen
        tokens, in the order slimlm's engine draws them, as much as the run consumes."""
        spec = text or self.recipe["data"]["train"]
        if not spec:
            raise SlimlmError("no training text: set data.train=FILE in the recipe or pass train_dataset(text=FILE)")
        d = self.recipe["data"]
        stream = load_tokens(self.tokenizer, spec, split="train", separator=d["separator"], max_tokens=d["max_tokens"],
                             **options(d))
        windows = as_dataset(stream, d["seqlen"])
        t = self.recipe["train"]
        return EngineOrder(windows, self.recipe["seed"], t["steps"] * t["grad_accum"] * t["batch_size"])

    # -- the loss --------------------------------------------------------------------------------------
    def _record_inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._inputs = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}

    def compute_loss(self, outputs, labels, num_items_in_batch=None):
        """`Trainer(compute_loss_func=...)`: the method's distillation loss of one micro-batch (next-token
        CE without a teacher). Positions whose next-token label is -100 are left out of both terms.
        Scaled for gradient accumulation as the Trainer expects of a compute_loss_func."""
        if labels is None:
            raise SlimlmError("compute_loss: the batch has no labels (the next-token targets): use train_dataset(), "
                              "or a collator that sets labels (DataCollatorForLanguageModeling(mlm=False))")
        logits = outputs.logits[:, :-1]
        targets = labels[:, 1:].to(logits.device)
        keep = targets != -100
        ce = F.cross_entropy(logits[keep].float(), targets[keep])
        parts = {"ce": ce.detach()}
        loss = ce
        teacher = self.method.teacher
        if teacher is not None:
            d = self.method.cfg["distill"]
            with torch.no_grad():
                teacher_logits = teacher(**{k: v for k, v in self._inputs.items() if v is not None}, use_cache=False).logits
            kl = kd_loss(logits[keep], teacher_logits[:, :-1][keep], d["temperature"], d["kl"])
            loss = d["alpha"] * kl + (1 - d["alpha"]) * ce
            parts["kl"] = kl.detach()
        share = keep.sum() / num_items_in_batch if num_items_in_batch is not None else 1.0 / self._accum
        if self.model.training:  # not in evaluation
            for k, v in parts.items():
                self._parts[k] = self._parts.get(k, 0.0) + float(v * share)
        return loss * share

    # -- the end ---------------------------------------------------------------------------------------
    def export(self) -> dict:
        """Bake the masks into the weights (m * W, exact zeros) and detach from the model; returns the
        method's extras. Done by the callback when the last step ends; idempotent."""
        if self.exported is None:
            self._hook.remove()
            self.exported = self.method.export(self.model)
            self.method.teacher = None  # frees its memory
        return self.exported

    def save(self, folder: str) -> Path:
        """Export (if the callback has not) and write a plain checkpoint: save_pretrained of the model with
        the masks baked, the tokenizer, and the recipe (slimlm.yaml). Checks the N:M pattern first."""
        self.export()
        sp = self.method.sparsity
        bad = [n for n, m in self.method.targets.items() if not is_valid_nm(models.weight_matrix(m), sp.n, sp.m)]
        if bad:
            raise SlimlmError(f"layer {bad[0]} is not {sp.n}:{sp.m} after export")
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        (folder / "slimlm.yaml").write_text(yaml.safe_dump(self.recipe, sort_keys=False))
        return folder


def _lr_factor(train: dict):
    """LambdaLR's factor for optimizer step `step` (0-based): slimlm's lr schedule over the base lr."""
    def factor(step: int) -> float:
        return budget.lr_at(train, step) / train["lr"]
    return factor


class EngineOrder(torch.utils.data.IterableDataset):
    """Windows in the order of slimlm's engine (`Trainer.batch`): example j of the run is window
    order(j // n)[j % n], each epoch's order a permutation seeded with (seed, epoch). Yields
    {"input_ids", "labels"} (labels = the inputs: the loss shifts them). Iterable, so the Trainer does not
    reshuffle it; on resume it skips the batches already consumed."""

    def __init__(self, windows, seed: int, count: int):
        """`windows`: anything with len() whose item i is window i (train.datasets.Windows, a 2-D tensor)."""
        self.windows, self.seed, self.count = windows, seed, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        n = len(self.windows)
        for j in range(self.count):
            epoch, pos = divmod(j, n)
            if pos == 0:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            window = self.windows[int(order[pos])]
            yield {"input_ids": window, "labels": window}


class SparseTrainingCallback(TrainerCallback):
    """Runs the method's per-step hooks at the Trainer's matching events (see the module docstring)."""

    def __init__(self, parts: TrainerParts):
        self.parts, self.pending = parts, []

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        parts, steps = self.parts, self.parts.recipe["train"]["steps"]
        if args.max_steps != steps:
            raise SlimlmError(f"TrainingArguments.max_steps={args.max_steps}, but the recipe's schedules (mask "
                              f"refreshes, decay, lr) are laid out for train.steps={steps}: use "
                              "parts.training_args(...) or set train.steps in the recipe")
        if getattr(optimizer, "optimizer", optimizer) is not parts.optimizer:
            raise SlimlmError("the Trainer built its own optimizer: pass optimizers=parts.optimizers "
                              "(slimlm's AdamW carries the decay of pruned weights)")
        if parts.exported is not None:
            raise SlimlmError("the masks were already baked (export): prepare the model again to train it")
        grad_clip = parts.recipe["train"]["grad_clip"] or 0.0
        if args.max_grad_norm != grad_clip:
            warnings.warn(f"TrainingArguments.max_grad_norm={args.max_grad_norm} differs from the recipe's "
                          f"train.grad_clip={grad_clip}", stacklevel=2)
        parts._accum = args.gradient_accumulation_steps
        # the Trainer may have moved the model: the teacher follows, and the decay reads the live masks
        device = next(parts.model.parameters()).device
        if parts.method.teacher is not None:
            parts.method.teacher.to(device)
        parts.method.configure_optimizer(parts.optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        self.parts._parts = {}
        self.parts.method.before_forward(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.parts.method.after_backward(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        record = {**self.parts._parts, **self.parts.method.after_step(state.global_step)}
        self.pending.append({k: v for k, v in record.items() if v is not None})

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The steps' numbers since the last log: ce and kl averaged, the method's last values."""
        if not self.pending or logs is None or "loss" not in logs:
            return
        merged = {}
        for record in self.pending:
            merged.update(record)
        for k in ("ce", "kl"):
            values = [r[k] for r in self.pending if k in r]
            if values:
                merged[k] = sum(values) / len(values)
        self.pending = []
        logs.update(merged)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(merged)

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step >= self.parts.recipe["train"]["steps"]:
            self.parts.export()
