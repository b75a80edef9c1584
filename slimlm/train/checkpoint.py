"""Checkpoints of a training run, beside the engine loop (`Trainer.save_checkpoint` / `load_checkpoint`).

One process or DDP: rank 0 writes the full state (model, optimizer moments, RNG) in safetensors. FSDP:
every rank writes its own shards with torch.distributed.checkpoint (DCP). Either kind resumes on any
number of processes (DCP reshards on load). `trainer_state.json` holds the step, tokens and the recipe;
a resume with a different recipe is refused, naming the keys that differ.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .. import recipe as recipes
from ..ops import sharded
from ..errors import SlimlmError, reading, writing
from ..formats import weights
from . import distributed


def last(run_dir: Path) -> str | None:
    """The newest checkpoint folder of a run, or None."""
    found = sorted(Path(run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(found[-1]) if found else None


def save(trainer) -> Path:
    """One process or DDP: rank 0 writes the full state (every rank holds the same) in safetensors.
    FSDP: every rank writes its own shards with torch.distributed.checkpoint (DCP). Either kind
    resumes on any number of processes (DCP reshards on load)."""
    final = trainer.run_dir / f"checkpoint-{trainer.step}"
    tmp = trainer.run_dir / f".checkpoint-{trainer.step}.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if trainer.fsdp:
        distributed.barrier()  # the folder exists before any rank writes into it
        _save_shards(trainer, tmp)
        distributed.barrier()  # every rank has written before rank 0 renames
    if not distributed.is_main():
        return final
    state = {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "recipe": trainer.recipe,
             "format": "dcp" if trainer.fsdp else "safetensors"}
    try:
        with writing(final):  # a full disk: one line, and no half-written checkpoint left behind
            if not trainer.fsdp:
                _save_full(trainer, tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept = sorted(trainer.run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in kept[: -trainer.cfg["keep_checkpoints"]]:
        shutil.rmtree(old)
    return final


def clean_leftovers(run_dir: Path) -> None:
    """Checkpoint folders a killed run was writing (`.checkpoint-N.tmp`): never complete, removed."""
    for leftover in sorted(Path(run_dir).glob(".checkpoint-*.tmp")):
        shutil.rmtree(leftover, ignore_errors=True)
        print(f"removed {leftover}, a checkpoint an interrupted run did not finish")


def _save_full(trainer, folder: Path) -> None:
    save_model(trainer.model, str(folder / "model.safetensors"))
    tensors = {"rng.torch": torch.get_rng_state()}
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, value in trainer.optimizer.state.get(p, {}).items():
            tensors[f"optim.{i}.{key}"] = value.contiguous()
    save_file(tensors, str(folder / "trainer.safetensors"))


def _save_shards(trainer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}, checkpoint_id=str(folder))


OTHER = "resume from another checkpoint of the run, or start over with --overwrite"


def read_state(folder: Path) -> dict:
    """trainer_state.json of a checkpoint, checked for what a resume needs."""
    state_file = folder / "trainer_state.json"
    if not folder.is_dir():
        raise SlimlmError(f"checkpoint {folder} not found: give a folder OUTPUT.checkpoints/checkpoint-N")
    if not state_file.is_file():
        raise SlimlmError(f"{folder} is not a slimlm checkpoint (no trainer_state.json)")
    with reading(state_file, "checkpoint state", OTHER):
        state = json.loads(state_file.read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("recipe"), dict) \
            or not isinstance(state.get("step"), int) or not isinstance(state.get("tokens_seen"), int):
        raise SlimlmError(f"checkpoint state {state_file} lacks its step, tokens or recipe: it is damaged or not "
                          f"slimlm's; {OTHER}")
    return state


def load(trainer, folder: str) -> None:
    path = Path(folder)
    state = read_state(path)
    diff = recipes.differences(state["recipe"], trainer.recipe)
    if diff:
        raise SlimlmError(f"checkpoint {folder} was made with a different recipe ({', '.join(diff)} differ): "
                          "resume with the recipe and overrides of the original run (train.lr may change)")
    if state["step"] > trainer.cfg["steps"]:
        raise SlimlmError(f"checkpoint {folder} is at step {state['step']}, past this run's train.steps="
                          f"{trainer.cfg['steps']}: resume with the train.steps of the original run")
    before, now = recipes.flatten(state["recipe"]).get("train.lr"), trainer.cfg["lr"]
    if before != now and distributed.is_main():  # the one way to follow the divergence advice
        print(f"resuming with train.lr={now:g} (the checkpoint was trained with {before:g})")
    if state.get("format") == "dcp":
        if not (path / ".metadata").is_file():
            raise SlimlmError(f"checkpoint {folder} says it holds DCP shards but has no .metadata file: {OTHER}")
        _load_shards(trainer, path)
    else:
        _load_full(trainer, path)
    trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
    rank = distributed.world()[0]
    if rank:  # the saved RNG state is rank 0's: the other ranks draw their own dropout again
        torch.manual_seed(trainer.recipe["seed"] + 1_000_003 * rank + trainer.step)


def _load_full_into_shards(trainer, file: Path) -> tuple[list[str], list[str]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # safetensors stores tied weights (embeddings / LM head) once, under either name
    owner = distributed.shared_parameters(trainer.model)
    names = set(trainer.model.state_dict())
    full = {owner.get(k, k): v for k, v in load_file(str(file)).items()}
    missing = sorted({owner.get(n, n) for n in names} - set(full))
    unexpected = sorted(set(full) - names)
    if not (missing or unexpected):
        set_model_state_dict(trainer.model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    return missing, unexpected


def _load_shards(trainer, path: Path) -> None:
    """A DCP checkpoint into this run's model and optimizer, sharded or not, on any process count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # DCP wraps every rank's failure; its last line names the cause
        raise SlimlmError(f"checkpoint {path} does not match the model: {str(err).strip().splitlines()[-1]}") from None
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"])


def _load_full(trainer, path: Path) -> None:
    """A full-state (one process / DDP) checkpoint; under FSDP every rank keeps its own rows of it."""
    model_file, trainer_file = path / "model.safetensors", path / "trainer.safetensors"
    for file in (model_file, trainer_file):
        if not file.is_file():
            raise SlimlmError(f"checkpoint {path} has no {file.name}: it is incomplete; {OTHER}")
        weights.check(file)
    with reading(model_file, "checkpoint weights", OTHER):
        if trainer.fsdp:
            missing, unexpected = _load_full_into_shards(trainer, model_file)
        else:
            missing, unexpected = load_model(trainer.model, str(model_file), strict=False)
    if missing or unexpected:
        raise SlimlmError(f"checkpoint {path} does not match the model: "
                          f"{sorted(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}")
    tensors = weights.read(trainer_file)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]  # the order of model.parameters()
    with reading(trainer_file, "optimizer state", OTHER):
        rng = tensors["rng.torch"]
        for i, p in enumerate(params):
            entries = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
            for k, v in entries.items():
                if k != "step" and v.shape != p.shape:
                    raise ValueError(f"optim.{i}.{k} is {tuple(v.shape)} for a parameter of {tuple(p.shape)}")
            if entries:
                trainer.optimizer.state[p] = {k: sharded.shard_like(v.to(p.device), p).clone() if k != "step" else v
                                              for k, v in entries.items()}
        torch.set_rng_state(rng)
