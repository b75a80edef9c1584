"""What a training method is: one object with a declared contract, found by its recipe name.

The job (`slimlm/train/job.py`) runs any registered method without naming it:

    method = methods.get(recipe["method"]["name"])(recipe, tokenizer)   # the recipe and the tokenizer
    trainers = method.run(RunContext(...))                                # engine run(s) with its hooks
    extras = method.export(model)                                         # the model as it is published
    report |= method.report_fields(model, extras); card lines from method.card_lines(report)

What a method declares (class attributes) and holds (instance attributes the job and engine read):

| name | what |
| --- | --- |
| `names` | the recipe `method.name` values it serves (`ast`, `naive` and `gmp` are one class) |
| `kinds` | the model kinds it trains: `causal-lm`, `sequence-classification` |
| `keys` | the `method.*` recipe keys it reads, with their defaults: the built-in ones are in `recipe.DEFAULTS`; a user's method brings new ones and `register` adds them |
| `teacher` | the frozen teacher (None: no distillation); the engine may shard it under FSDP |
| `targets` | {layer name: module} it compresses (after `export`: the published model's layers) |
| `sparsity` | the N:M pattern the published model must satisfy (checked on reload), or None |

Hooks (`setup`, `configure_optimizer`, `before_forward`, `loss`, `after_backward`, `after_step`,
`export`) are the engine's (`slimlm/train/engine.py`); `loss` defaults to distillation from `teacher`
(plain cross-entropy without one). `run` is one engine run; LPAF overrides it with its two stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import recipe as recipes
from ..errors import SlimlmError
from ..train.distill import distill_loss
from ..train.engine import Hooks, Trainer


@dataclass
class RunContext:
    """What a method's `run` gets from the job."""
    model: object
    recipe: dict
    train: object  # token stream or labeled examples
    valid: object | None
    run_dir: Path  # checkpoints of this run
    resume: str | None  # a checkpoint folder to continue from


class Method(Hooks):
    names: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("causal-lm", "sequence-classification")
    keys: dict = {}

    def __init__(self, recipe: dict, tokenizer=None):
        self.recipe, self.cfg, self.tokenizer = recipe, recipe["method"], tokenizer
        self.teacher = None
        self.targets: dict = {}
        self.sparsity = None

    def loss(self, model, batch: dict):
        return distill_loss(model, self.teacher, batch, self.cfg["distill"])

    def run(self, ctx: RunContext) -> list[Trainer]:
        """Train; returns the engine runs in order (their histories are joined in the report)."""
        trainer = Trainer(ctx.model, self, ctx.recipe, ctx.train, ctx.valid, ctx.run_dir)
        if ctx.resume:
            trainer.load_checkpoint(ctx.resume)
        trainer.train()
        return [trainer]

    def target_names(self) -> list[str]:
        """The layers whose parameters the report counts as compressed."""
        return list(self.targets)

    def report_fields(self, model, extras: dict) -> dict:
        """What this method adds to report.json (besides `export`'s extras)."""
        return {}

    def card_lines(self, report: dict) -> tuple[str, list[str]]:
        """(what was done, its parts) for the model card's first sentence."""
        return "fine-tuned", ["dense"]

    def card_notes(self, report: dict) -> list[str]:
        """Further sentences for the model card (what the folder holds beyond a stock checkpoint)."""
        return []

    def slimlm_only(self, report: dict) -> bool:
        """Whether the published folder needs slimlm.load (plain transformers would miss layers)."""
        return False


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Make a method available to recipes under each of `cls.names` (usable as a class decorator).
    Its new `method.*` keys (`cls.keys`) join the recipe schema; a key that exists must keep its default."""
    if not cls.names:
        raise SlimlmError(f"method class {cls.__name__} declares no names")
    for key, default in cls.keys.items():
        known = recipes.DEFAULTS["method"]
        if key in known and known[key] != default:
            raise SlimlmError(f"method {cls.__name__}: key method.{key} exists with default {known[key]!r}, not {default!r}")
        known.setdefault(key, default)
    for name in cls.names:
        REGISTRY[name] = cls
        if name not in recipes.CHOICES["method.name"]:  # recipes may now name it
            recipes.CHOICES["method.name"] += (name,)
    return cls


def get(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise SlimlmError(f"unknown method '{name}': registered are {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
