"""The method contract: the registry finds every built-in by its recipe name, and a method written and
registered from Python runs through `slimlm train` like a built-in one."""
import json

import pytest
import torch
import yaml

from slimlm import methods, recipe
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.models import find_targets, weight_matrix


def test_every_builtin_recipe_names_a_registered_method():
    for name in recipe.builtin_names():
        cls = methods.get(recipe.resolve(name, [])["method"]["name"])
        assert issubclass(cls, methods.Method)
    with pytest.raises(SlimlmError, match="unknown method 'nope': registered are ast, finetune, gmp, lpaf"):
        methods.get("nope")


class ZeroSmallest(methods.Method):
    """A user's method: zero the smallest `zero_fraction` of every block weight at the start, keep them at
    zero while fine-tuning (masked gradients), distil from the dense model."""
    names = ("zero-smallest",)
    kinds = ("causal-lm",)
    keys = {"zero_fraction": 0.25}

    def setup(self, trainer):
        from slimlm.train.distill import make_teacher

        self.teacher = make_teacher(trainer.model, self.cfg["distill"], trainer.bf16)
        self.targets = find_targets(trainer.model)
        self.masks = {}
        for name, module in self.targets.items():
            W = weight_matrix(module)
            cut = W.abs().flatten().kthvalue(int(self.cfg["zero_fraction"] * W.numel())).values
            self.masks[name] = W.abs() > cut
            W.data.mul_(self.masks[name])

    def after_backward(self, step):
        for name, module in self.targets.items():
            weight_matrix(module).grad.mul_(self.masks[name])

    @torch.no_grad()
    def after_step(self, step):
        for name, module in self.targets.items():
            weight_matrix(module).mul_(self.masks[name])  # weight decay must not revive them
        return {"kept": float(sum(m.float().mean() for m in self.masks.values()) / len(self.masks))}

    def card_lines(self, report):
        return f"with the smallest {self.cfg['zero_fraction']:.0%} of block weights zeroed", ["masked fine-tuning"]


@pytest.fixture
def registry():
    """Registration changes the registry and the recipe schema: undo it after the test."""
    import copy

    saved = dict(methods.REGISTRY), copy.deepcopy(recipe.DEFAULTS), dict(recipe.CHOICES)
    yield
    methods.REGISTRY.clear()
    methods.REGISTRY.update(saved[0])
    recipe.DEFAULTS.clear()
    recipe.DEFAULTS.update(saved[1])
    recipe.CHOICES.update(saved[2])


def test_a_method_registered_from_python_runs_through_slimlm_train(model_dirs, text_file, tmp_path, registry):
    methods.register(ZeroSmallest)
    path = tmp_path / "zero.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "zero-smallest", "zero_fraction": 0.5},
                                    "train": {"steps": 3, "batch_size": 2, "warmup_steps": 1}}))
    out = tmp_path / "z"
    assert main(["train", "--recipe", str(path), "--model", str(model_dirs["llama"]), "--output", str(out),
                 f"data.train={text_file}", "data.seqlen=32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "zero-smallest" and report["recipe"]["method"]["zero_fraction"] == 0.5
    assert 0.49 < report["parameters"]["target_fraction"] < 0.51
    assert [round(h["kept"], 2) for h in report_history(out)] == [0.5, 0.5, 0.5]
    card = (out / "README.md").read_text()
    assert "with the smallest 50% of block weights zeroed" in card and "distillation from the dense starting model" in card
    with pytest.raises(SlimlmError, match="method.zero_fraction exists with default 0.25, not 0.1"):
        methods.register(type("Other", (methods.Method,), {"names": ("other",), "keys": {"zero_fraction": 0.1}}))


def report_history(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
