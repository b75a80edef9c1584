"""The training job behind `slimlm train`: recipe -> model, data, hooks -> engine -> published folder."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .. import data, models, output, slorb
from ..errors import SlimlmError
from ..inspect import layer_stats, totals
from .engine import Trainer
from .plots import plot_curves
from .sparse import SparseTraining

METHODS = {"ast": SparseTraining, "naive": SparseTraining, "gmp": SparseTraining}


def checkpoint_dir(output_dir: str) -> Path:
    """Checkpoints and the live metrics log sit beside the output folder, which appears only at the end."""
    out = Path(output_dir)
    return out.with_name(out.name + ".checkpoints")


def run(recipe: dict, output_dir: str, overwrite: bool = False, resume: str | None = None) -> dict:
    out_path = output.check_output_dir(output_dir, overwrite)
    if not recipe["data"]["train"]:
        raise SlimlmError("the recipe has no training data: set data.train=FILE")
    start = time.perf_counter()
    loaded = models.load(recipe["model"], device=recipe["train"]["device"])
    if loaded.kind != "causal-lm":
        raise SlimlmError(f"model '{recipe['model']}' is a {loaded.kind} model; `slimlm train` recipes need a causal LM")
    train = data.load_tokens(loaded.tokenizer, recipe["data"]["train"])
    valid = data.load_tokens(loaded.tokenizer, recipe["data"]["valid"]) if recipe["data"]["valid"] else None
    hooks = METHODS[recipe["method"]["name"]](recipe, loaded.tokenizer)
    run_dir = checkpoint_dir(output_dir)
    if not resume and run_dir.exists():
        if not overwrite:
            raise SlimlmError(f"{run_dir} exists from an earlier run: pass --resume {run_dir}/checkpoint-N "
                              "to continue it, or --overwrite to start over")
        shutil.rmtree(run_dir)
    trainer = Trainer(loaded.model, hooks, recipe, train, valid, run_dir)
    if resume:
        trainer.load_checkpoint(resume)
    history = trainer.train()
    extras = hooks.export(loaded.model)

    layers = layer_stats(hooks.targets, ranks=False)
    report = {
        "command": "train", "method": recipe["method"]["name"], "sparsity": recipe["method"]["sparsity"],
        "base_model": recipe["model"], "recipe": recipe, "steps": trainer.step, "tokens_seen": trainer.tokens_seen,
        "seconds": time.perf_counter() - start, "final": history[-1] if history else {},
        "best_val_ppl": min((h["val_ppl"] for h in history if "val_ppl" in h), default=None),
        "final_val_ppl": next((h["val_ppl"] for h in reversed(history) if "val_ppl" in h), None),
        "totals": totals(loaded.model, hooks.targets), "layers": layers, "resumed_from": resume,
        **extras, "model_kind": loaded.kind, "versions": output.versions(),
    }

    def save_extras(folder: Path) -> None:
        if hooks.slorbs:
            slorb.save(hooks.slorbs, folder)
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            (folder / "metrics.jsonl").write_text(metrics.read_text())
            plot_curves([json.loads(line) for line in metrics.read_text().splitlines()], folder / "training_curves.png",
                        title=f"{recipe['method']['name']} {recipe['method']['sparsity']} on {recipe['model']}")

    probe = trainer.windows[0, :64].unsqueeze(0).to(trainer.device)
    output.publish(loaded, out_path, overwrite, recipe, report, _card(report), list(hooks.targets),
                   hooks.sparsity, probe, extra_save=save_extras)
    return report


def _card(report: dict) -> str:
    r = report["recipe"]
    m = r["method"]
    parts = [f"masks: {m['mask_update']}" + (f" (refreshed every {m['mask_interval']} steps)" if m["mask_update"] != "fixed" else "")]
    if m["decay"]["mode"] != "none":
        parts.append(f"SR-STE decay λ_max={m['decay']['lambda_max']:g} ({m['decay']['mode']})")
    if m["distill"]["enabled"]:
        parts.append(f"distillation α={m['distill']['alpha']}, T={m['distill']['temperature']}")
    summary = [f"`{report['base_model']}` retrained to **{report['sparsity']}** sparsity with slimlm's "
               f"**{report['method']}** recipe: {'; '.join(parts)}.",
               f"Training: {report['steps']} steps, {report['tokens_seen']:,} tokens of `{r['data']['train']}` "
               f"(seqlen {r['data']['seqlen']}, lr {r['train']['lr']:g}, seed {r['seed']})."]
    if report["slorb_layers"]:
        summary.append(f"SLoRB side paths in {report['slorb_layers']} layers ({report['slorb_parameters']:,} "
                       f"parameters, group size {m['slorb']['group_size']}) are stored in `slorb.safetensors`: "
                       "load with `slimlm.load(PATH)`; plain transformers loads the 2:4 part without them.")
    # the final number describes the exported weights (GMP's best is from its early, denser steps)
    results = {f"validation perplexity ({r['data']['valid']}, seqlen {r['data']['seqlen']})": report["final_val_ppl"]} \
        if report["final_val_ppl"] else {}
    if report["slorb_layers"]:
        how = "import slimlm\nmodel = slimlm.load(\"PATH\")  # rebuilds the SLoRB side paths"
    else:
        how = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"PATH\")"
    return output.model_card(f"{report['base_model']} — {report['method']} {report['sparsity']}", report["base_model"],
                             summary, results, how, ["slimlm", "sparse-training", report["method"],
                                                     f"sparsity-{report['sparsity'].replace(':', '-')}"])
