"""SparseGPT's faster loop (issue 19) computes what the published per-column loop computes."""
import importlib.util
from pathlib import Path

import pytest
import torch

from slimlm.ops.sparsity import parse_sparsity
from slimlm.prune.sparsegpt import sparsegpt_prune

_spec = importlib.util.spec_from_file_location(
    "sparsegpt_speed", Path(__file__).resolve().parents[1] / "benchmarks" / "sparsegpt_speed.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _problem(rows, cols, seed, dead=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * cols, cols, generator=g) * torch.rand(cols, generator=g) * 3  # uneven input scales
    X[:, :dead] = 0  # dead inputs: zero Hessian diagonal
    return torch.randn(rows, cols, generator=g), 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("sp", ["2:4", "1:4", "4:8", "0.5", "0.7"])
@pytest.mark.parametrize("rows,cols,blocksize", [(24, 64, 16), (40, 100, 32), (16, 96, 128)])  # partial last block
def test_equals_per_column_reference(sp, rows, cols, blocksize):
    sparsity = parse_sparsity(sp)
    W, H = _problem(rows, cols, seed=rows + cols, dead=3)
    ours = sparsegpt_prune(W, H, sparsity, blocksize=blocksize)
    ref = bench.reference_prune(W, H, sparsity, blocksize=blocksize)
    assert torch.equal(ours == 0, ref == 0)  # the same mask
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(W, _problem(rows, cols, seed=rows + cols, dead=3)[0])  # the input is not modified


def test_dtype_and_shape_kept():
    W, H = _problem(8, 32, seed=1)
    out = sparsegpt_prune(W.to(torch.bfloat16), H, parse_sparsity("2:4"))
    assert out.dtype == torch.bfloat16 and out.shape == W.shape
