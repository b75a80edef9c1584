"""The output folder contract shared by every command that writes a model.

HF layout (safetensors + tokenizer), resolved settings as YAML, report.json, model card README.md.
Everything is written to a hidden temporary folder next to the destination, the model is reloaded
from there and checked (same outputs, still valid N:M), and only then is the folder renamed into
place: a failed run leaves nothing half-written.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from . import locks
from . import markdown as md
from .ops import slorb
from .errors import SlimlmError, reading, write_failure, writing
from .models import SLIMLM_MODEL_TYPE, SLIMLM_ONLY, LoadedModel, base_license, load, weight_matrix
from .ops.sparsity import Sparsity, is_valid_nm


def check_output_dir(output: str, overwrite: bool) -> Path:
    """Fail early (before any work) when the destination cannot or must not be written; then hold the
    output's lock (one run per output) and clean what an interrupted run left beside it."""
    path = Path(output).expanduser()
    here = Path.cwd().resolve()
    if not path.name or path.resolve() == here or path.resolve() in here.parents or path.resolve() == Path.home():
        raise SlimlmError(f"--output {output} is the current folder, a folder above it or the home folder: "
                          "name a new folder for the result")
    if path.is_symlink():
        raise SlimlmError(f"--output {output} is a symbolic link (to {os.readlink(path)}): slimlm never replaces "
                          "what a link points to; give the real path or a new name")
    if path.exists() and not path.is_dir():
        raise SlimlmError(f"--output {output} is a file, not a folder: choose another name")
    if path.exists() and not overwrite:
        raise SlimlmError(f"output folder {output} already exists: choose another or pass --overwrite")
    if path.exists() and not is_slimlm_output(path):
        raise SlimlmError(f"output folder {output} is not a slimlm output (no report.json or slimlm.yaml): "
                          "--overwrite replaces only folders slimlm wrote; choose another --output")
    if not path.parent.is_dir():
        raise SlimlmError(f"parent folder of {output} does not exist: create it first or choose another --output")
    if locks.claim(path):  # the run that holds the lock cleans up after the one that held it before
        clean_leftovers(path)
    return path


def is_slimlm_output(folder: Path) -> bool:
    """A folder that --overwrite may replace: one slimlm wrote, or an empty one."""
    return (folder / "report.json").is_file() or (folder / "slimlm.yaml").is_file() or not any(folder.iterdir())


def clean_leftovers(output: Path) -> None:
    """What a killed run left beside `output` (it held the lock, which is ours now): staging folders are
    removed; a previous output moved aside (.NAME.old) comes back if nothing replaced it."""
    old = output.with_name(f".{output.name}.old")
    if old.is_dir() and not old.is_symlink():
        if output.exists():
            shutil.rmtree(old)
            print(f"removed {old}, left by an interrupted run (the output had already been replaced)")
        else:
            old.rename(output)
            print(f"restored {output} from {old.name}, where an interrupted run had moved it aside")
    for leftover in sorted(output.parent.glob(f".{glob.escape(output.name)}.tmp-*")) + \
            sorted(output.parent.glob(f".{glob.escape(output.name)}.staging-*")):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
            print(f"removed {leftover}, left by an interrupted run")


def versions() -> dict:
    import transformers

    from .version import __version__

    return {"slimlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@torch.no_grad()
def outputs_of(model, probe: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=probe)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def _verify(original: LoadedModel, folder: Path, probe: torch.Tensor, target_names: list[str],
            sparsity: Sparsity | None) -> dict:
    original.model.eval()  # dropout off: compare the functions, not two random draws
    reloaded = load(str(folder), dtype=str(next(original.model.parameters()).dtype).replace("torch.", ""))
    device = next(original.model.parameters()).device
    reloaded.model.to(device)
    diff = (outputs_of(original.model, probe) - outputs_of(reloaded.model, probe)).abs().max().item()
    if diff > 1e-5:
        raise SlimlmError(f"reload check failed: outputs of the saved model differ by {diff:.3g}")
    if sparsity is not None and sparsity.is_nm:
        modules = dict(reloaded.model.named_modules())
        for name in target_names:
            if not is_valid_nm(weight_matrix(modules[name]), sparsity.n, sparsity.m):
                raise SlimlmError(f"reload check failed: layer {name} is not valid {sparsity} after reload")
    return {"max_abs_output_diff": diff, "nm_valid": sparsity is not None and sparsity.is_nm}


def staging_dir(destination: Path) -> Path:
    """A new hidden folder beside `destination` to build it in (finish it with `open_up`). Beside, not in
    /tmp: the rename into place stays on one file system; the next run on `destination` removes it if a
    killed run left it (clean_leftovers)."""
    with writing(destination):
        return Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))


def open_up(folder: Path) -> None:
    """Give a finished staging folder and its files the permissions mkdir and open would have given them
    under the user's umask: mkdtemp makes the folder 0700 and safetensors writes 0600, which the rename
    would carry over, leaving the output unreadable to colleagues on a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def needs_slimlm(folder: Path) -> bool:
    """Does this folder hold something plain transformers cannot rebuild (quantized codes, factorized
    layers, SLoRB side paths)? It would load it with those layers randomly initialised."""
    config = json.loads((folder / "config.json").read_text())
    return bool(config.get("slimlm_quant") or config.get("slimlm_lowrank") or (folder / "slorb.safetensors").exists())


def mark_slimlm_only(folder: Path) -> None:
    """Make plain transformers refuse the folder instead of loading a broken model: an unknown
    model_type is an error there (naming the type, which says to use slimlm.load); models.load restores it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config[SLIMLM_MODEL_TYPE], config["model_type"] = config["model_type"], SLIMLM_ONLY
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def publish(loaded: LoadedModel, output: Path, overwrite: bool, settings: dict, report: dict, card: str,
            target_names: list[str], sparsity: Sparsity | None, probe: torch.Tensor, extra_save=None,
            drop: list[str] | None = None, shown_path: Path | None = None) -> None:
    """Save, verify by reloading, then move into place. `report` gains the verification result.
    `extra_save(folder)` writes what the model needs beside its checkpoint (e.g. SLoRB tensors,
    quantized codes); `drop` names state-dict entries that extra_save stores instead. The card's "PATH"
    becomes the folder's path (`shown_path` when the folder is converted further before it lands)."""
    output = Path(output)
    card = card.replace('"PATH"', json.dumps(str(shown_path or output)))
    tmp = staging_dir(output)
    try:
        # SLoRB side paths go beside the stock checkpoint, never inside it (whichever command wrote the model)
        dropped = set(drop or [])
        state = {k: v for k, v in loaded.model.state_dict().items() if ".slorb." not in k and k not in dropped}
        loaded.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        if slorb.attached(loaded.model):
            slorb.save(slorb.attached(loaded.model), tmp)
        if extra_save is not None:
            extra_save(tmp)
        if needs_slimlm(tmp):
            mark_slimlm_only(tmp)
        report["reload_check"] = _verify(loaded, tmp, probe, target_names, sparsity)
        (tmp / "slimlm.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "README.md").write_text(card)
        open_up(tmp)
        move_into_place(tmp, output, overwrite)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, a folder made read-only: one line naming the output
            raise write_failure(err, output) from err
        raise


def move_into_place(finished: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished folder to `output`; an existing one (with `overwrite`) is moved aside first
    and deleted only once the new folder is in place."""
    if output.exists():
        if not overwrite:
            raise SlimlmError(f"output folder {output} already exists: pass --overwrite")
        if output.is_symlink() or not output.is_dir():  # never follow a link, never delete what slimlm did not write
            raise SlimlmError(f"--output {output} is no longer a folder slimlm wrote: choose another --output")
        old = output.with_name(f".{output.name}.old")
        with writing(output):
            output.rename(old)
            try:
                finished.rename(output)
            except BaseException:
                old.rename(output)  # the previous output stays where it was
                raise
        shutil.rmtree(old)
    else:
        with writing(output):
            finished.rename(output)


def spent(report: dict) -> tuple[int, float | None]:
    """(tokens, seconds) a command spent: training tokens, else calibration tokens (0 without calibration)."""
    if "tokens_seen" in report:
        return report["tokens_seen"], report.get("seconds")
    calib = report.get("calibration")
    return (calib["windows"] * calib["seqlen"] if calib else 0), report.get("prune_seconds", report.get("seconds"))


def budget_line(report: dict) -> str:
    """What the result cost, whichever command wrote it: tokens (and for one-shot work, which
    calibration data), wall time and the library versions."""
    tokens, seconds = spent(report)
    calib = report.get("calibration")
    if "tokens_seen" in report:
        what = f"{tokens:,} training tokens"
    elif calib:
        what = (f"{tokens:,} calibration tokens ({calib['windows']} windows of {calib['seqlen']} from "
                f"{md.code(calib['data'])}, seed {calib['seed']})")
    else:
        what = "no calibration data"
    v = report.get("versions", {})
    line = (f"Budget: {what}; {seconds / 60:.1f} min wall time" if seconds is not None else f"Budget: {what}")
    return line + (f" (slimlm {v.get('slimlm')}, torch {v.get('torch')})." if v else ".")


def model_card(title: str, report: dict, summary: list[str], results: dict[str, float] | None,
               how_to_load: str, tags: list[str], slimlm_only: bool = False) -> str:
    """A short model card with Hub-style front matter: what was done (`summary`), its scores, what it
    cost (from `report`, the same for every command) and how to load it. `slimlm_only`: the folder loads
    with slimlm.load only (plain transformers refuses it)."""
    base_model = report["base_model"]
    license = base_license(base_model)
    lines = ["---", f"library_name: {'slimlm' if slimlm_only else 'transformers'}", "tags:"] + [f"- {t}" for t in tags]
    if license:
        lines.append(f"license: {license}")
    if "/" in base_model and not Path(base_model).exists():
        lines.append(f"base_model: {base_model}")
    lines += ["---", "", f"# {md.text(title)}", "", *summary, ""]
    if results:
        lines += ["| evaluation | value |", "| --- | --- |"]
        lines += [f"| {md.cell(k)} | {v:.4g} |" if isinstance(v, float) else f"| {md.cell(k)} | {md.cell(v)} |"
                  for k, v in results.items()]
        lines.append("")
    lines += [budget_line(report), "",
              f"Licence: `{license}`, the base model's." if license else
              f"Licence: the base model `{base_model}` records none here: check its terms before sharing this derivative.",
              "", "## How to load", "", "```python", how_to_load.strip(), "```", ""]
    if slimlm_only:
        lines += ["Plain `transformers` refuses this folder (its `config.json` names the model type "
                  f"`{SLIMLM_ONLY}`): it would build the compressed layers with random weights. "
                  "`slimlm.load` rebuilds them and returns an ordinary `transformers` model.", ""]
    lines += [
              "Made with [slimlm](https://pypi.org/project/slimlm/); `report.json` holds every setting and "
              "measurement, `slimlm.yaml` the resolved settings.", ""]
    return "\n".join(lines)


TASKS_BEGIN, TASKS_END = "<!-- slimlm:lm-eval -->", "<!-- /slimlm:lm-eval -->"


def write_atomically(path: str | Path, write) -> None:
    """`write(tmp_path)` beside the destination, then rename: a reader never sees half a file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SlimlmError(f"folder of {path} does not exist: create it first or choose another path")
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        with writing(path):
            write(tmp)
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _replace_file(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def task_section(tasks: dict) -> str:
    """The model card's table of lm-eval scores."""
    lines = [TASKS_BEGIN, "## lm-evaluation-harness", "",
             "| task | metric | value | stderr | examples | shots | evaluated |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    from .eval.tasks import scores

    for task, r in sorted(tasks.items()):
        for metric, value, err in scores(r):
            lines.append(f"| {md.cell(task)} | {md.cell(metric)} | {value:.4f} | {'—' if err is None else f'{err:.4f}'} | "
                         f"{r['samples']} | {r['num_fewshot']} | {r['date'][:10]} |")
    return "\n".join(lines + ["", TASKS_END])


def perplexity_key(result: dict) -> str:
    """What makes two perplexities comparable: the data, window length, windows and BOS protocol."""
    return f"{result['data']}|{result['seqlen']}|{result['windows']}|{result.get('bos', 'stream')}"


def read_report(folder: Path) -> dict:
    """The report.json of a finished folder, to merge new results into."""
    path = folder / "report.json"
    with reading(path, "run report", "pass --no-report to leave it alone, or write the folder again"):
        report = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(report, dict):
            raise ValueError("not a JSON object")
    return report


def record_perplexity(folder: Path, result: dict) -> None:
    """Merge a `slimlm eval --data` result into a finished folder's report.json under `slimlm_eval`
    (one entry per data/windows/BOS protocol; a re-run replaces it), so `slimlm report` can compare
    runs measured the same way."""
    import datetime

    folder = Path(folder)
    report = read_report(folder)
    entry = {k: v for k, v in result.items() if k != "model"} | {"date": datetime.date.today().isoformat()}
    report["slimlm_eval"] = {**report.get("slimlm_eval", {}), perplexity_key(result): entry}
    _replace_file(folder / "report.json", json.dumps(report, indent=2))


def record_task_scores(folder: Path, tasks: dict) -> None:
    """Merge lm-eval scores into an output folder: report.json under `lm_eval` (one entry per task,
    a re-run replaces it) and the model card's score table (kept between markers, above 'How to load')."""
    folder = Path(folder)
    report = read_report(folder)
    report["lm_eval"] = {**report.get("lm_eval", {}), **tasks}
    _replace_file(folder / "report.json", json.dumps(report, indent=2))
    card_path = folder / "README.md"
    if not card_path.is_file():
        return
    card, section = card_path.read_text(), task_section(report["lm_eval"])
    if TASKS_BEGIN in card and TASKS_END in card:
        before, rest = card.split(TASKS_BEGIN, 1)
        card = before + section + rest.split(TASKS_END, 1)[1]
    elif "## How to load" in card:
        card = card.replace("## How to load", section + "\n\n## How to load", 1)
    else:
        card = card.rstrip("\n") + "\n\n" + section + "\n"
    _replace_file(card_path, card)
