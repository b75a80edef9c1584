"""Training under torchrun (2 processes, gloo on CPU) gives what one process gives, with DDP and with
FSDP2; checkpoints written by 2 processes resume on 1 (and, for FSDP, on 2)."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from slimlm import recipe
from slimlm.train.job import run as train_run


def torchrun(args, tmp_path, module=("-m", "slimlm", "train")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *module, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from conftest import DATA

    path = tmp_path_factory.mktemp("ddp") / "train.txt"
    path.write_text((DATA / "sotu" / "valid.txt").read_text()[:30_000])
    return path


def overrides(model_dir, text, *extra):
    # fp32: the runs are compared entry by entry (bf16 autocast would depend on the reduction order)
    return [f"model={model_dir}", f"data.train={text}", "data.seqlen=32", "train.batch_size=4", "train.steps=6",
            "train.warmup_steps=2", "train.lr=3e-3", "train.save_every=3", "method.mask_interval=2",
            "method.slorb.group_size=8", "train.bf16=false", *extra]


def losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a_dir, b_dir, atol, file="model.safetensors"):
    a, b = load_file(str(a_dir / file)), load_file(str(b_dir / file))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ast_slorb_on_two_processes_matches_one_and_resumes_on_one(strategy, model_dirs, text, tmp_path):
    args = overrides(model_dirs["llama"], text)
    train_run(recipe.resolve("ast-slorb", args), str(tmp_path / "single"))
    torchrun(["--recipe", "ast-slorb", "--output", str(tmp_path / "two"), *args, f"parallel.strategy={strategy}"], tmp_path)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
    assert_same_weights(tmp_path / "single", tmp_path / "two", atol=1e-5)
    assert_same_weights(tmp_path / "single", tmp_path / "two", atol=1e-5, file="slorb.safetensors")
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["reload_check"]["nm_valid"] and report["tokens_seen"] == 6 * 4 * 32
    checkpoint = tmp_path / "two.checkpoints" / "checkpoint-3"
    written = json.loads((checkpoint / "trainer_state.json").read_text())["format"]
    assert written == {"ddp": "safetensors", "fsdp": "dcp"}[strategy]
    # a checkpoint written by 2 processes resumes in 1
    train_run(recipe.resolve("ast-slorb", args), str(tmp_path / "resumed"), resume=str(checkpoint))
    assert_same_weights(tmp_path / "single", tmp_path / "resumed", atol=1e-5)
    # and on 2 processes with FSDP, whichever strategy wrote it (a DDP checkpoint is cut into row shards)
    torchrun(["--recipe", "ast-slorb", "--output", str(tmp_path / "resumed2"), "--resume", str(checkpoint), *args,
              "parallel.strategy=fsdp"], tmp_path)
    assert_same_weights(tmp_path / "single", tmp_path / "resumed2", atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lpaf_on_two_processes_matches_one(strategy, model_dirs, text, tmp_path):
    args = overrides(model_dirs["llama"], text, "method.keep=0.5", "method.lpaf.svd_iters=3",
                     "method.distill.alpha=0.5",
                     # learned scores are parameters of their own, refused under FSDP (movement.py)
                     *(["method.movement.score=sensitivity"] if strategy == "fsdp" else []))
    train_run(recipe.resolve("lpaf", args), str(tmp_path / "single"))
    sharded_teacher = ["parallel.shard_teacher=true"] if strategy == "fsdp" else []  # one teacher, both stages
    torchrun(["--recipe", "lpaf", "--output", str(tmp_path / "two"), *args, f"parallel.strategy={strategy}",
              *sharded_teacher], tmp_path)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
    # the SVDs turn float rounding differences of the averaged gradients (1e-6) into slightly larger
    # differences of the singular vectors
    assert_same_weights(tmp_path / "single", tmp_path / "two", atol=1e-4)


@pytest.mark.slow
def test_fsdp_movement_on_conv1d_matches_one_process(model_dirs, text, tmp_path):
    """GPT-2's Conv1D stores (in, out): its weights are sharded along dim 1, its rows; movement scores
    are sharded like the weights and gathered for the top-k. Dropout off: under data parallelism each
    rank draws its own dropout masks, which one process cannot reproduce."""
    args = overrides(model_dirs["gpt2"], text, "method.keep=0.5", "method.movement.mask_interval=2",
                     "method.movement.score=sensitivity")
    config = json.loads((model_dirs["gpt2"] / "config.json").read_text())
    nodrop = tmp_path / "gpt2-nodrop"
    nodrop.mkdir()
    for f in model_dirs["gpt2"].iterdir():
        (nodrop / f.name).write_bytes(f.read_bytes())
    (nodrop / "config.json").write_text(json.dumps({**config, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}))
    args[0] = f"model={nodrop}"
    train_run(recipe.resolve("movement", args), str(tmp_path / "single"))
    torchrun(["--recipe", "movement", "--output", str(tmp_path / "two"), *args, "parallel.strategy=fsdp"], tmp_path)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
    assert_same_weights(tmp_path / "single", tmp_path / "two", atol=1e-5)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_with_activation_checkpointing(model_dirs, text, tmp_path):
    """bf16 all-gathers and compute with fp32 gradient reduction: not comparable to fp32 bit for bit,
    but it trains (loss falls) and exports a valid 2:4 model."""
    args = overrides(model_dirs["llama"], text, "train.steps=8", "train.grad_checkpointing=true",
                     "parallel.strategy=fsdp", "parallel.mixed_precision=bf16")
    torchrun(["--recipe", "ast", "--output", str(tmp_path / "bf16"), *args], tmp_path)
    curve = losses(tmp_path / "bf16")
    assert all(map(math.isfinite, curve)) and curve[-1] < curve[0]
    assert json.loads((tmp_path / "bf16" / "report.json").read_text())["reload_check"]["nm_valid"]


SHARDED_MASKS = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers.pytorch_utils import Conv1D
    from slimlm.ops import masked, sharded
    from slimlm.ops.sparsity import is_valid_nm
    from slimlm.train.distributed import _row_placements

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    # uneven rows over 2 ranks (5 = 3 + 2); a Conv1D sharded along its outputs (4 = 2 + 2), and one
    # whose 3 outputs do not split evenly, sharded along its inputs instead (masks from the gathered weight)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), Conv1D(4, 8), Conv1D(3, 8))
    wanted = [masked.magnitude_nm_mask(layer, 2, 4) for layer in model]
    weights = [masked.dense_weight(layer).detach().clone() for layer in model]
    for layer, mask in zip(model, wanted):
        masked.attach_mask(layer, mask, ste=True)
    fully_shard(model, shard_placement_fn=_row_placements(model))
    for layer, mask, weight in zip(model, wanted, weights):
        stored = masked.dense_weight(layer)
        assert sharded.is_sharded(stored)
        assert sharded.shard_dim(stored) == (0 if isinstance(layer, torch.nn.Linear) or stored.shape[1] == 3 else 1)
        assert torch.equal(masked.magnitude_nm_mask(layer, 2, 4), mask)  # rows masked locally, then gathered
        # shard_like cuts the rows FSDP gave this rank, and gather_like puts them back together
        assert torch.equal(sharded.local(sharded.shard_like(weight, stored)), stored.to_local())
        assert torch.equal(sharded.gather_like(sharded.local(sharded.shard_like(mask, stored)), stored), mask)
        assert is_valid_nm(masked.as_out_in(layer, mask), 2, 4)
    print("ok", dist.get_rank())
""")


@pytest.mark.slow
def test_row_sharded_masks_equal_full_masks_with_uneven_shards(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SHARDED_MASKS)
    out = torchrun([], tmp_path, module=(str(script),))
    assert out.count("ok") == 2
