"""Data-parallel training under torchrun (2 processes, gloo on CPU) gives what one process gives."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from slimlm import recipe
from slimlm.train.job import run as train_run


def torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "slimlm", "train", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from conftest import DATA

    path = tmp_path_factory.mktemp("ddp") / "train.txt"
    path.write_text((DATA / "sotu" / "valid.txt").read_text()[:30_000])
    return path


def overrides(model_dir, text, *extra):
    return [f"model={model_dir}", f"data.train={text}", "data.seqlen=32", "train.batch_size=4", "train.steps=6",
            "train.warmup_steps=2", "train.lr=3e-3", "train.save_every=3", "method.mask_interval=2",
            "method.slorb.group_size=8", *extra]


def losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a_dir, b_dir, atol):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_ddp_ast_slorb_matches_one_process_and_resumes_on_one(model_dirs, text, tmp_path):
    args = overrides(model_dirs["llama"], text)
    train_run(recipe.resolve("ast-slorb", args), str(tmp_path / "single"))
    torchrun(["--recipe", "ast-slorb", "--output", str(tmp_path / "ddp"), *args], tmp_path)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
    assert_same_weights(tmp_path / "single", tmp_path / "ddp", atol=1e-5)
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["reload_check"]["nm_valid"] and report["tokens_seen"] == 6 * 4 * 32
    # a checkpoint written by 2 processes resumes in 1
    train_run(recipe.resolve("ast-slorb", args), str(tmp_path / "resumed"),
              resume=str(tmp_path / "ddp.checkpoints" / "checkpoint-3"))
    assert_same_weights(tmp_path / "single", tmp_path / "resumed", atol=1e-5)


@pytest.mark.slow
def test_ddp_lpaf_matches_one_process(model_dirs, text, tmp_path):
    args = overrides(model_dirs["llama"], text, "method.keep=0.5", "method.lpaf.svd_iters=3",
                     "method.distill.alpha=0.5")
    train_run(recipe.resolve("lpaf", args), str(tmp_path / "single"))
    torchrun(["--recipe", "lpaf", "--output", str(tmp_path / "ddp"), *args], tmp_path)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
    # the SVDs turn float rounding differences of the averaged gradients (1e-6) into slightly larger
    # differences of the singular vectors
    assert_same_weights(tmp_path / "single", tmp_path / "ddp", atol=1e-4)
