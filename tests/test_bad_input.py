"""Bad input across every command, table-driven (issue 17): damaged or foreign files, bad data, impossible
settings, writes that fail, pickled weights. Each case asserts a non-zero exit, exactly one error line
that names the culprit, no traceback, and no partial output (nor a hidden leftover) at the output path.

Cases are (id, build) where build(env) prepares what it needs under env.tmp and returns a Case.
Everything runs in-process through `slimlm.cli.main` on tiny random models (a few minutes in all)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimlm.cli import main



@dataclass
class Case:
    argv: list[str]
    says: list[str]  # substrings the one error line must contain (the culprit, what to do)
    output: Path | None = None  # must not exist afterwards (or keep its `before` content)
    before: dict | None = None  # {file name: text} an existing output must still hold
    patches: list = field(default_factory=list)  # (object, attribute, replacement) for monkeypatch
    seconds: float | None = None  # must answer within this many seconds


@dataclass
class Env:
    tmp: Path
    llama: Path
    gpt2: Path
    bert: Path
    text: Path
    pruned: Path
    quantized: Path
    ckpt: Path  # checkpoint-1 of a 2-step naive run on llama
    ckpt_args: list[str]


# -- shared artefacts, built once -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(model_dirs, text_file, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-input-base")
    llama = str(model_dirs["llama"])
    pruned, quantized, run = base / "pruned", base / "quantized", base / "run"
    assert main(["prune", "--model", llama, "--method", "magnitude", "--output", str(pruned)]) == 0
    assert main(["quantize", "--model", llama, "--bits", "4", "--group-size", "16", "--calib", str(text_file),
                 "--nsamples", "2", "--seqlen", "32", "--method", "rtn", "--output", str(quantized)]) == 0
    ckpt_args = ["train", "--recipe", "naive", f"model={llama}", f"data.train={text_file}", "data.seqlen=32",
                 "train.steps=2", "train.save_every=1", "train.batch_size=2", "method.init=magnitude",
                 "method.distill.enabled=false", "train.device=cpu"]
    assert main(ckpt_args + ["--output", str(run)]) == 0
    ckpt = base / "run.checkpoints" / "checkpoint-1"
    assert (ckpt / "trainer_state.json").is_file()
    return Env(tmp=base, llama=model_dirs["llama"], gpt2=model_dirs["gpt2"], bert=model_dirs["bert"],
               text=text_file, pruned=pruned, quantized=quantized, ckpt=ckpt, ckpt_args=ckpt_args)


def copy_of(env: Env, folder: Path, name: str) -> Path:
    dest = env.tmp / "cases" / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest)
    return dest


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def random_bytes(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def out(env: Env, name: str) -> Path:
    (env.tmp / "outs").mkdir(exist_ok=True)
    return env.tmp / "outs" / name


def prune_cmd(env, model, output, *extra):
    return ["prune", "--model", str(model), "--method", "magnitude", "--output", str(output), *extra]


def calib_cmd(env, command, output, *extra, model=None):
    head = ["prune", "--method", "wanda"] if command == "prune" else ["quantize", "--method", "rtn", "--group-size", "16"]
    return [*head, "--model", str(model or env.llama), "--calib", str(env.text), "--nsamples", "2", "--seqlen", "32",
            "--output", str(output), *extra]


def train_cmd(env, output, *overrides, model=None):
    return ["train", "--recipe", "naive", f"model={model or env.llama}", f"data.train={env.text}", "data.seqlen=32",
            "train.steps=2", "train.batch_size=2", "method.init=magnitude", "method.distill.enabled=false",
            "train.device=cpu", "--output", str(output), *overrides]


def resume_cmd(env, ckpt: Path, output):
    return [*env.ckpt_args, "--output", str(output), "--resume", str(ckpt)]


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def enospc(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


def erofs(*_, **__):
    raise OSError(errno.EROFS, "Read-only file system")


# -- damaged or foreign files -----------------------------------------------------------------------------

def damaged_weights(how, command):
    def build(env):
        folder = copy_of(env, env.llama, f"weights-{how.__name__}-{command}")
        how(folder / "model.safetensors")
        o = out(env, f"w-{how.__name__}-{command}")
        argv = {"prune": prune_cmd(env, folder, o), "quantize": calib_cmd(env, "quantize", o, model=folder),
                "eval": ["eval", "--model", str(folder), "--data", str(env.text), "--seqlen", "32"],
                "inspect": ["inspect", str(folder)], "train": train_cmd(env, o, model=folder),
                "bench": ["bench", "--model", str(folder), "--dense", str(env.llama), "--device", "cpu"]}[command]
        return Case(argv, ["model.safetensors", "damaged"], o)
    return build


def truncated_quant(env):
    folder = copy_of(env, env.quantized, "trunc-quant")
    truncate(folder / "quant.safetensors")
    return Case(["eval", "--model", str(folder), "--data", str(env.text), "--seqlen", "32"],
                ["quant.safetensors", "damaged"])


def config_key_for_missing_layers(key):
    def build(env):
        source = env.quantized if key == "slimlm_quant" else env.llama
        folder = copy_of(env, source, f"config-{key}")
        def change(c):
            if key == "slimlm_quant":
                c[key]["layers"] = {"model.layers.9.mlp.nothing": c[key]["layers"][next(iter(c[key]["layers"]))]} \
                    if isinstance(c[key].get("layers"), dict) else ["model.layers.9.mlp.nothing"]
            else:
                c[key] = {"model.layers.9.mlp.nothing": 4}
        edit_json(folder / "config.json", change)
        return Case(["inspect", str(folder)], ["model.layers.9.mlp.nothing"])
    return build


def slorb_for_missing_layers(env):
    folder = copy_of(env, env.llama, "slorb-missing")
    save_file({"model.layers.7.mlp.up_proj.S": torch.zeros(64, 2)}, str(folder / "slorb.safetensors"),
              metadata={"layout": json.dumps({"model.layers.7.mlp.up_proj": {"group_size": 16, "train_x": False}})})
    return Case(["eval", "--model", str(folder), "--data", str(env.text), "--seqlen", "32"],
                ["slorb.safetensors", "model.layers.7.mlp.up_proj"])


def config_not_json(env):
    folder = copy_of(env, env.llama, "config-not-json")
    (folder / "config.json").write_text("{not json")
    o = out(env, "config-not-json")
    return Case(prune_cmd(env, folder, o), ["config.json"], o)


def only_pickled_weights(env):
    folder = copy_of(env, env.llama, "pickle-only")
    (folder / "model.safetensors").unlink()

    class Boom:  # would run code if unpickled
        def __reduce__(self):
            return (os.system, (f"touch {env.tmp / 'PWNED'}",))

    torch.save({"x": Boom()}, folder / "pytorch_model.bin")
    o = out(env, "pickle-only")
    return Case(prune_cmd(env, folder, o), ["pytorch_model.bin", "safetensors"], o)


def checkpoint_damage(name, damage, says):
    def build(env):
        run = env.tmp / "cases" / f"ck-{name}.checkpoints"
        if run.exists():
            shutil.rmtree(run)
        ckpt = run / "checkpoint-1"
        shutil.copytree(env.ckpt, ckpt)
        damage(ckpt, env)
        o = env.tmp / "cases" / f"ck-{name}"
        return Case(resume_cmd(env, ckpt, o), says, o)
    return build


def state_is(value):
    return lambda ckpt, env: (ckpt / "trainer_state.json").write_text(value)


def state_edit(change):
    return lambda ckpt, env: edit_json(ckpt / "trainer_state.json", change)


def foreign_trainer(ckpt, env):
    save_file({"optim.0.exp_avg": torch.zeros(3)}, str(ckpt / "trainer.safetensors"))


def teacher_with_another_tokenizer(env):
    """As many tokens as the student, numbered differently: two ids swapped."""
    folder = copy_of(env, env.llama, "teacher-other-tokenizer")
    def swap(t):
        vocab = t["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[100:102]
        vocab[a], vocab[b] = vocab[b], vocab[a]
    edit_json(folder / "tokenizer.json", swap)
    o = out(env, "teacher-tok")
    argv = [a for a in train_cmd(env, o) if a != "method.distill.enabled=false"]
    return Case(argv + ["method.distill.enabled=true", f"method.distill.teacher={folder}"], ["teacher", "tokenizer"], o)


def _with(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder


def report_damage(name, damage, says):
    def build(env):
        folder = copy_of(env, env.pruned, f"report-{name}")
        damage(folder)
        o = out(env, f"report-{name}.md")
        return Case(["report", str(folder), "--output", str(o)], says, o)
    return build


def compressed_tensors_inspect(env):
    o = env.tmp / "cases" / "ct-export"
    o.parent.mkdir(exist_ok=True)
    if not o.exists():
        pytest.importorskip("compressed_tensors")
        assert main(calib_cmd(env, "quantize", o, "--format", "compressed-tensors")) == 0
    return Case(["inspect", str(o)], ["compressed-tensors"])


# -- data ---------------------------------------------------------------------------------------------------

def jsonl(name, body: bytes, says):
    def build(env):
        path = write_text(env.tmp / "data" / f"{name}.jsonl", body)
        return Case(["eval", "--model", str(env.llama), "--data", str(path), "--seqlen", "32"], [path.name, *says])
    return build


def non_utf8_recipe(env):
    path = write_text(env.tmp / "recipes" / "latin1.yaml", "# caf\xe9\nmethod: {name: naive}\n".encode("latin-1"))
    o = out(env, "latin1-recipe")
    return Case(["train", "--recipe", str(path), "--output", str(o)], ["latin1.yaml", "UTF-8"], o)


def data_is_folder(env):
    return Case(["eval", "--model", str(env.llama), "--data", str(env.tmp), "--seqlen", "32"], [str(env.tmp)])


def missing_relative(kind):
    def build(env):
        os.chdir(env.tmp)
        (env.tmp / "runs").mkdir(exist_ok=True)
        if kind == "model":
            return Case(["eval", "--model", "runs/x", "--data", str(env.text)], ["runs/x", "not found"], seconds=5)
        if kind == "data":
            return Case(["eval", "--model", str(env.llama), "--data", "runs/x.txt"], ["runs/x.txt", "not found"],
                        seconds=5)
        return Case(["eval", "--model", "./nothing/here", "--data", str(env.text)], ["./nothing/here", "not found"],
                    seconds=5)
    return build


# -- impossible settings ------------------------------------------------------------------------------------

def cli_setting(command, *extra, says):
    def build(env):
        o = out(env, f"set-{command}-{'-'.join(extra)}".replace("/", "_"))
        if command == "eval":
            argv = ["eval", "--model", str(env.llama), "--data", str(env.text), *extra]
            return Case(argv, says)
        return Case(calib_cmd(env, command, o, *extra), says, o)
    return build


def recipe_setting(*overrides, says):
    def build(env):
        o = out(env, "recipe-" + "-".join(overrides).replace("/", "_"))
        return Case(train_cmd(env, o, *overrides), says, o)
    return build


# -- writes that fail ---------------------------------------------------------------------------------------

def output_in_missing_folder(env):
    o = env.tmp / "no" / "such" / "out"
    return Case(prune_cmd(env, env.llama, o), [str(o.parent), "does not exist"], o)


def output_is_file(env):
    o = write_text(out(env, "a-file"), "keep me")
    return Case(prune_cmd(env, env.llama, o, "--overwrite"), [str(o), "file"], before={"": "keep me"}, output=o)


def output_is_cwd(env):
    os.chdir(env.tmp / "outs")
    return Case(prune_cmd(env, env.llama, ".", "--overwrite"), ["--output ."])


def output_is_symlink(env):
    target = env.tmp / "elsewhere"
    target.mkdir(exist_ok=True)
    (target / "precious.txt").write_text("mine")
    link = out(env, "link")
    if not link.is_symlink():
        link.symlink_to(target)
    return Case(prune_cmd(env, env.llama, link, "--overwrite"), [str(link), "symbolic link"])


def overwrite_foreign_folder(env):
    o = out(env, "not-slimlm")
    o.mkdir(exist_ok=True)
    (o / "notes.txt").write_text("mine")
    return Case(prune_cmd(env, env.llama, o, "--overwrite"), [str(o), "not a slimlm output"],
                before={"notes.txt": "mine"}, output=o)


def file_option_in_missing_folder(command, option):
    def build(env):
        target = env.tmp / "no-such-dir" / "result.x"
        argv = {"eval": ["eval", "--model", str(env.llama), "--data", str(env.text), "--seqlen", "32",
                         "--max-windows", "1"],
                "inspect": ["inspect", str(env.llama)],
                "report": ["report", str(env.pruned)]}[command] + [option, str(target)]
        return Case(argv, [str(target.parent)], target)
    return build


def disk_full_publish(command):
    def build(env):
        import transformers

        o = out(env, f"full-{command}")
        if not o.exists():
            assert main(prune_cmd(env, env.llama, o)) == 0
        before = {"report.json": (o / "report.json").read_text()}
        argv = prune_cmd(env, env.llama, o, "--overwrite") if command == "prune" else \
            calib_cmd(env, "quantize", o, "--overwrite")
        return Case(argv, ["no space left"], o, before,
                    patches=[(transformers.PreTrainedModel, "save_pretrained", enospc)])
    return build


def read_only_parent(env):
    import tempfile

    o = out(env, "read-only")
    return Case(prune_cmd(env, env.llama, o), [str(o), "read-only"], o, patches=[(tempfile, "mkdtemp", erofs)])


def disk_full_checkpoint(env):
    from slimlm.train import checkpoint

    o = out(env, "full-ckpt")
    return Case(train_cmd(env, o, "train.save_every=1"), ["checkpoint-1", "no space left"], o,
                patches=[(checkpoint, "save_model", enospc)])


CASES = {
    # damaged or foreign files
    **{f"{how.__name__}-weights-{command}": damaged_weights(how, command)
       for how in (truncate, random_bytes) for command in ("prune", "eval", "inspect")},
    "truncate-weights-quantize": damaged_weights(truncate, "quantize"),
    "truncate-weights-train": damaged_weights(truncate, "train"),
    "truncate-weights-bench": damaged_weights(truncate, "bench"),
    "truncated-quant-safetensors": truncated_quant,
    "config-slimlm_quant-missing-layers": config_key_for_missing_layers("slimlm_quant"),
    "config-slimlm_lowrank-missing-layers": config_key_for_missing_layers("slimlm_lowrank"),
    "slorb-for-missing-layers": slorb_for_missing_layers,
    "config-not-json": config_not_json,
    "pickle-only-weights": only_pickled_weights,
    "ckpt-missing-trainer-state": checkpoint_damage(
        "no-state", lambda c, e: (c / "trainer_state.json").unlink(), ["checkpoint-1", "trainer_state.json"]),
    "ckpt-missing-model": checkpoint_damage(
        "no-model", lambda c, e: (c / "model.safetensors").unlink(), ["model.safetensors"]),
    "ckpt-missing-trainer": checkpoint_damage(
        "no-trainer", lambda c, e: (c / "trainer.safetensors").unlink(), ["trainer.safetensors"]),
    "ckpt-truncated-trainer": checkpoint_damage(
        "trunc-trainer", lambda c, e: truncate(c / "trainer.safetensors"), ["trainer.safetensors", "damaged"]),
    "ckpt-truncated-model": checkpoint_damage(
        "trunc-model", lambda c, e: truncate(c / "model.safetensors"), ["model.safetensors", "damaged"]),
    "ckpt-foreign-trainer": checkpoint_damage("foreign-trainer", foreign_trainer, ["trainer.safetensors"]),
    "ckpt-foreign-model": checkpoint_damage(
        "foreign-model", lambda c, e: shutil.copy(e.gpt2 / "model.safetensors", c / "model.safetensors"),
        ["checkpoint-1", "does not match"]),
    "ckpt-state-not-json": checkpoint_damage("state-not-json", state_is("{oops"), ["trainer_state.json"]),
    "ckpt-state-is-list": checkpoint_damage("state-list", state_is("[1, 2]"), ["trainer_state.json"]),
    "ckpt-state-lacks-recipe": checkpoint_damage(
        "state-no-recipe", state_edit(lambda s: s.pop("recipe")), ["trainer_state.json", "recipe"]),
    "ckpt-state-dcp-without-metadata": checkpoint_damage(
        "state-dcp", state_edit(lambda s: s.update(format="dcp")), ["checkpoint-1"]),
    "ckpt-step-past-the-end": checkpoint_damage(
        "step-500", state_edit(lambda s: s.update(step=500)), ["step 500", "train.steps"]),
    "resume-missing-folder": lambda env: Case(resume_cmd(env, env.tmp / "nowhere" / "checkpoint-3",
                                                         out(env, "resume-missing")),
                                              ["nowhere/checkpoint-3"], out(env, "resume-missing")),
    "eval-records-into-a-damaged-report": lambda env: Case(
        ["eval", "--model", str(_with(copy_of(env, env.pruned, "eval-report"), "report.json", "[1")), "--data",
         str(env.text), "--seqlen", "32", "--max-windows", "1"], ["report.json", "--no-report"]),
    "report-json-not-json": report_damage("not-json", lambda f: (f / "report.json").write_text("{"), ["report.json"]),
    "report-json-is-list": report_damage("list", lambda f: (f / "report.json").write_text("[]"), ["report.json"]),
    "report-json-wrong-types": report_damage(
        "types", lambda f: edit_json(f / "report.json", lambda r: r.update(totals=5, evaluation="x", settings=[])),
        ["report.json"]),
    "report-metrics-not-json": report_damage(
        "metrics", lambda f: (f / "metrics.jsonl").write_text('{"step": 1}\nnot json\n'), ["metrics.jsonl"]),
    "report-metrics-wrong-shape": report_damage(
        "metrics-shape", lambda f: (f / "metrics.jsonl").write_text('[1]\n"x"\n'), ["metrics.jsonl"]),
    "inspect-compressed-tensors": compressed_tensors_inspect,
    "teacher-with-another-tokenizer": teacher_with_another_tokenizer,
    # data
    "jsonl-text-missing": jsonl("nofield", b'{"body": "x"}\n', ["line 1"]),
    "jsonl-text-number": jsonl("number", b'{"text": 5}\n', ["line 1"]),
    "jsonl-text-null": jsonl("null", b'{"text": null}\n', ["line 1"]),
    "jsonl-not-utf8": jsonl("latin1", '{"text": "caf\xe9"}\n'.encode("latin-1"), ["UTF-8"]),
    "recipe-not-utf8": non_utf8_recipe,
    "data-is-a-folder": data_is_folder,
    "missing-relative-model": missing_relative("model"),
    "missing-relative-data": missing_relative("data"),
    "missing-dot-model": missing_relative("dot"),
    # impossible settings, command line
    "prune-seqlen-0": cli_setting("prune", "--seqlen", "0", says=["--seqlen"]),
    "prune-seqlen-neg": cli_setting("prune", "--seqlen", "-1", says=["--seqlen"]),
    "prune-blocksize-0": cli_setting("prune", "--method", "sparsegpt", "--blocksize", "0", says=["--blocksize"]),
    "prune-nsamples-0": cli_setting("prune", "--nsamples", "0", says=["--nsamples"]),
    "prune-percdamp-neg": cli_setting("prune", "--percdamp", "-1", says=["--percdamp"]),
    "prune-eval-windows-0": cli_setting("prune", "--eval", "x.txt", "--eval-windows", "0", says=["--eval-windows"]),
    "prune-bad-include-regex": cli_setting("prune", "--include", "[", says=["include", "["]),
    "prune-bad-ignore-regex": cli_setting("prune", "--ignore", "(", says=["ignore", "("]),
    "prune-device-foo": cli_setting("prune", "--device", "foo", says=["foo"]),
    "prune-device-cuda-without-gpu": lambda env: Case(calib_cmd(env, "prune", out(env, "cuda"), "--device", "cuda"),
                                                      ["cuda"], out(env, "cuda"),
                                                      patches=[(torch.cuda, "is_available", lambda: False)]),
    "prune-reconstruct-steps-0": cli_setting("prune", "--reconstruct", "--reconstruct-steps", "0",
                                             says=["--reconstruct-steps"]),
    "quantize-group-size-0": cli_setting("quantize", "--group-size", "0", says=["--group-size"]),
    "quantize-group-size-neg": cli_setting("quantize", "--group-size", "-4", says=["--group-size"]),
    "eval-max-windows-neg": cli_setting("eval", "--max-windows", "-2", says=["--max-windows"]),
    "eval-max-windows-0": cli_setting("eval", "--max-windows", "0", says=["--max-windows"]),
    "eval-seqlen-0": cli_setting("eval", "--seqlen", "0", says=["--seqlen"]),
    "eval-batch-size-0": cli_setting("eval", "--batch-size", "0", says=["--batch-size"]),
    "eval-max-length-0": cli_setting("eval", "--max-length", "0", says=["--max-length"]),
    # impossible settings, recipe overrides
    **{f"recipe-{key}={value}": recipe_setting(f"{key}={value}", says=[key])
       for key, value in [("data.seqlen", 0), ("data.seqlen", -1), ("train.batch_size", 0), ("train.grad_accum", 0),
                          ("train.save_every", 0), ("train.log_every", 0), ("train.eval_every", 0),
                          ("train.keep_checkpoints", 0), ("data.eval_windows", 0), ("method.mask_interval", 0),
                          ("method.slorb.group_size", 0), ("method.slorb.group_size", -16), ("train.steps", 0),
                          ("train.steps", -1), ("train.lr", -1), ("train.lr", 0), ("method.distill.alpha", 2),
                          ("train.warmup_steps", -3), ("train.eps", 0), ("method.distill.temperature", 0),
                          ("method.nsamples", 0), ("train.grad_clip", -1)]},
    "recipe-malformed-list": recipe_setting("train.betas=[0.9,", says=["train.betas"]),
    "recipe-model-null": recipe_setting("model=null", says=["model"]),
    "recipe-missing-file": lambda env: Case(["train", "--recipe", str(env.tmp / "nope.yaml"), "--output",
                                             str(out(env, "r"))], ["nope.yaml"]),
    # writes that fail
    "output-in-missing-folder": output_in_missing_folder,
    "output-is-a-file": output_is_file,
    "output-is-cwd": output_is_cwd,
    "output-is-symlink": output_is_symlink,
    "overwrite-foreign-folder": overwrite_foreign_folder,
    "eval-json-missing-folder": file_option_in_missing_folder("eval", "--json"),
    "inspect-json-missing-folder": file_option_in_missing_folder("inspect", "--json"),
    "inspect-spectra-missing-folder": file_option_in_missing_folder("inspect", "--spectra"),
    "report-output-missing-folder": file_option_in_missing_folder("report", "--output"),
    "disk-full-prune": disk_full_publish("prune"),
    "disk-full-quantize": disk_full_publish("quantize"),
    "read-only-output-folder": read_only_parent,
    "disk-full-checkpoint": disk_full_checkpoint,
}


def hidden_leftovers(output: Path) -> list[str]:
    parent = output.parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{output.name}."))


@pytest.mark.parametrize("build", list(CASES.values()), ids=list(CASES))
def test_bad_input_gets_one_clear_line(build, env, capsys, monkeypatch):
    monkeypatch.chdir(env.tmp)
    case = build(env)
    for obj, name, replacement in case.patches:
        monkeypatch.setattr(obj, name, replacement)
    capsys.readouterr()
    start = time.perf_counter()
    try:
        rc = main([str(a) for a in case.argv])
    except SystemExit as exit:  # argparse's own refusal: usage and one error line
        rc = exit.code
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc not in (0, None), f"exit 0 for {case.argv}"
    assert "Traceback" not in err and "unexpected" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for text in case.says:
        assert text.lower() in errors[0].lower(), f"{text!r} not in: {errors[0]}"
    if case.seconds is not None:
        assert seconds < case.seconds
    assert not (env.tmp / "PWNED").exists(), "a pickle was unpickled"
    if case.output is not None:
        output = env.tmp / case.output if not Path(case.output).is_absolute() else Path(case.output)
        if case.before is None:
            assert not output.exists(), f"partial output left at {output}"
        else:
            for name, text in case.before.items():
                assert (output / name if name else output).read_text() == text, f"{output} changed"
        assert hidden_leftovers(output) == [], "temporaries left beside the output"


# -- what the table cannot show: interrupted runs, concurrent runs, divergence, escaping ----------------------

def test_leftovers_of_killed_runs_are_cleaned_and_a_moved_aside_output_comes_back(env, capsys):
    o = out(env, "leftovers")
    (o.parent / f".{o.name}.tmp-abc123").mkdir()
    (o.parent / f".{o.name}.tmp-abc123" / "model.safetensors").write_text("half")
    (o.parent / f".{o.name}.staging-x1").mkdir()
    assert main(prune_cmd(env, env.llama, o)) == 0
    assert "left by an interrupted run" in capsys.readouterr().out
    assert hidden_leftovers(o) == [] and (o / "report.json").is_file()
    # killed between moving the old output aside and renaming the new one in: the old one comes back
    o.rename(o.parent / f".{o.name}.old")
    assert main(prune_cmd(env, env.llama, o)) == 2
    captured = capsys.readouterr()
    assert "restored" in captured.out and "already exists" in captured.err
    assert (o / "report.json").is_file() and hidden_leftovers(o) == []


def test_a_killed_checkpoint_write_is_removed_on_resume(env, capsys):
    o = env.tmp / "cases" / "resume-leftover"
    run = o.with_name(o.name + ".checkpoints")
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(env.ckpt, run / "checkpoint-1")
    (run / ".checkpoint-2.tmp").mkdir()
    assert main(resume_cmd(env, run / "checkpoint-1", o)) == 0
    assert "did not finish" in capsys.readouterr().out and not (run / ".checkpoint-2.tmp").exists()


def test_two_runs_cannot_write_one_output(env, capsys):
    import subprocess
    import sys

    o = out(env, "locked")
    lock = o.with_name(f".{o.name}.lock")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True)\n"
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(prune_cmd(env, env.llama, o, "--overwrite")) == 2
        assert "another slimlm run (process 4242) is writing" in capsys.readouterr().err
        assert main(train_cmd(env, o)) == 2  # the checkpoint folder OUTPUT.checkpoints is the same run's
        assert "another slimlm run" in capsys.readouterr().err
        assert not o.exists() and not o.with_name(o.name + ".checkpoints").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert main(prune_cmd(env, env.llama, o)) == 0  # released with its process
    assert not lock.exists()


def test_nan_gradients_with_a_finite_loss_stop_before_the_step_and_the_advice_works(env, capsys, monkeypatch):
    """Step 2's gradients are NaN while its loss is finite (as with a huge lr or eps=0): the run stops
    before stepping on them, names checkpoint-1 (finite) as the last good one, and resuming from it
    with the lower train.lr it suggests is allowed."""
    o = env.tmp / "cases" / "nan"
    shutil.rmtree(o.with_name("nan.checkpoints"), ignore_errors=True)
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def poisoned(parameters, *args, **kwargs):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 2:
            for p in parameters:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return clip(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    args = train_cmd(env, o, "train.save_every=1", "train.steps=3", "train.lr=0.001")
    assert main(args) == 2
    err = capsys.readouterr().err
    run = o.with_name("nan.checkpoints")
    assert "diverged at step 2" in err and "gradients" in err and "checkpoint-1" in err, err
    assert f"--resume {run / 'checkpoint-1'} train.lr=0.0001" in err
    assert not (run / "checkpoint-2").exists() and not o.exists()
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(run / "checkpoint-1" / "model.safetensors")).values())
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    resume = [a for a in args if a != "train.lr=0.001"] + ["train.lr=0.0001", "--resume", str(run / "checkpoint-1")]
    assert main(resume) == 0
    assert "resuming with train.lr=0.0001 (the checkpoint was trained with 0.001)" in capsys.readouterr().out
    assert json.loads((o / "report.json").read_text())["steps"] == 3


def test_user_strings_are_escaped_in_model_cards_and_reports(env, tmp_path):
    calib = write_text(tmp_path / "we|ird`name.txt", env.text.read_text())
    o = tmp_path / "run|<b>x"
    assert main(["prune", "--model", str(env.llama), "--method", "wanda", "--calib", str(calib), "--nsamples", "2",
                 "--seqlen", "32", "--output", str(o)]) == 0
    card = (o / "README.md").read_text()
    assert "we\\|ird`name.txt" in card and "`` " in card  # a code span that holds the backtick and the pipe
    page = tmp_path / "r.md"
    assert main(["report", str(o), str(env.pruned), "--output", str(page)]) == 0
    text = page.read_text()
    assert "<b>" not in text.split("## Runs")[0]  # in the table: escaped, never markup
    rows = [line for line in text.splitlines() if line.startswith("|")]
    cells = {len([c for c in re.split(r"(?<!\\)\|", row)]) for row in rows}
    assert len(cells) == 1, rows  # every row has as many cells as the header
