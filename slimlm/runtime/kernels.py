"""Runnable forms of compressed layers: each target layer of a compressed model becomes the fastest
stock-PyTorch module that computes it, and says which kernel (backend) it uses. `slimlm bench` times
them; `slimlm.load(path, runtime=True)` puts them in place.

- 2:4 on CUDA: PyTorch's semi-structured sparse tensors (cuSPARSELt, or CUTLASS), fp16/bf16.
  On CPU PyTorch has no 2:4 kernel: the layer runs as a dense matmul over its stored zeros, and the
  backend says so. Asking for semi-structured on CPU is an error, never a silent fallback.
- int8 codes with one scale per output channel: torch._weight_int8pack_mm (weight-only int8).
- int4 codes in groups of 32/64/128/256 on CPU: torch._weight_int4pack_mm_for_cpu (weight-only int4).
  Other quantized layouts have no stock kernel: they run dequantized, and the backend says so.
- low-rank layers (LowRankLinear) already are their fast form: two thin matmuls.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SlimlmError, first_line
from ..ops.factorized import LowRankLinear, linear_view, replace_module
from ..ops.sparsity import is_valid_nm

SPARSE_KERNELS = ("auto", "semi-structured", "dense")
INT4_CPU_GROUPS = (32, 64, 128, 256)  # what torch's CPU int4 weight-only kernel accepts


class _RowsLinear(nn.Module):
    """Base: the kernels take a 2-D input, so fold the leading dims and unfold them afterwards."""

    def __init__(self, bias: torch.Tensor | None, out_features: int):
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, x.shape[-1]))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class SemiStructuredLinear(_RowsLinear):
    """y = x W^T + b with W held as a PyTorch semi-structured (2:4) sparse tensor."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "layer"):
        super().__init__(bias, weight.shape[0])
        self.weight_sparse = nn.Parameter(to_semi_structured(weight, name), requires_grad=False)

    def matmul(self, x):
        return F.linear(x, self.weight_sparse)


class Int8WeightLinear(_RowsLinear):
    """Weight-only int8: int8 codes (out, in) times one scale per output channel."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__(bias, codes.shape[0])
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.reshape(-1).to(dtype).contiguous())

    def matmul(self, x):
        return torch._weight_int8pack_mm(x, self.codes, self.scales)


class Int4WeightLinear(_RowsLinear):
    """Weight-only int4 on CPU: our symmetric codes q in [-8, 7] are the kernel's unsigned nibbles q + 8
    with zero offset 0 (the kernel computes (u - 8) * scale + zero), so the result is exactly q * scale."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__(bias, codes.shape[0])
        self.group_size = group_size
        nibbles = (codes.to(torch.int32) + 8).contiguous()
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(nibbles, 1))
        scales = scales.t().to(dtype)  # (groups, out)
        self.register_buffer("scale_and_zero", torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous())

    def matmul(self, x):
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scale_and_zero)


def to_semi_structured(weight: torch.Tensor, name: str = "layer") -> torch.Tensor:
    """A 2:4 weight as a PyTorch semi-structured sparse tensor, or a SlimlmError saying why not."""
    if weight.device.type != "cuda":
        raise SlimlmError(f"{name}: semi-structured 2:4 kernels (cuSPARSELt/CUTLASS) run only on a CUDA GPU; "
                          "PyTorch has no 2:4 kernel for CPUs: run with --device cuda, or --sparse-kernel dense "
                          "to time the 2:4 layers as dense matmuls")
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise SlimlmError(f"{name}: semi-structured 2:4 kernels need float16 or bfloat16 weights, got "
                          f"{weight.dtype}: pass --dtype float16")
    if not is_valid_nm(weight, 2, 4):
        raise SlimlmError(f"{name}: weight is not 2:4 sparse, so it cannot use the 2:4 kernel")
    from torch.sparse import to_sparse_semi_structured

    try:
        return to_sparse_semi_structured(weight.detach().contiguous())
    except (RuntimeError, ValueError) as err:
        raise SlimlmError(f"{name}: PyTorch refused the semi-structured 2:4 conversion of its "
                          f"{tuple(weight.shape)} weight on this GPU: {first_line(err)}") from None


def semi_structured_backend() -> str:
    from torch.sparse import SparseSemiStructuredTensor

    return "CUTLASS 2:4" if getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False) else "cuSPARSELt 2:4"


def layer_kind(module: nn.Module, quantized: dict | None) -> str:
    """What compression a target layer carries: 'low-rank r=R', 'int8'/'int4' (with a '2:4+' prefix
    when the codes are 2:4), '2:4', or 'dense'."""
    if isinstance(module, LowRankLinear):
        return f"low-rank r={module.rank}"
    weight, _ = linear_view(module)
    sparse = weight.shape[1] % 4 == 0 and is_valid_nm(weight, 2, 4) and bool((weight == 0).any())
    prefix = "2:4+" if sparse else ""
    if quantized is not None:
        return f"{prefix}int{quantized['bits']}"
    return "2:4" if sparse else "dense"


def runnable(name: str, module: nn.Module, kind: str, sparse_kernel: str, codes: tuple | None = None,
             group_size: int | None = None) -> tuple[nn.Module, str]:
    """(module to run, backend description) for one compressed target layer. `codes`: (int8 codes,
    scales) of a quantized layer; `group_size`: its group (None: per output channel)."""
    if sparse_kernel not in SPARSE_KERNELS:
        raise SlimlmError(f"unknown --sparse-kernel '{sparse_kernel}': choose one of {', '.join(SPARSE_KERNELS)}")
    if kind.startswith("low-rank"):
        return module, f"two thin matmuls ({kind})"
    weight, bias = linear_view(module)
    device = weight.device
    if kind.startswith("2:4") and (sparse_kernel == "semi-structured" or (sparse_kernel == "auto" and device.type == "cuda")):
        # quantized 2:4 layers run their dequantized values (the weight) through the fp16 2:4 kernel
        note = "" if kind == "2:4" else f" on dequantized {kind[4:]} codes"
        return SemiStructuredLinear(weight, bias, name), f"{semi_structured_backend()} ({weight.dtype}){note}"
    if kind.endswith("int8") and device.type == "cpu":
        if group_size is None:
            return Int8WeightLinear(*codes, bias, weight.dtype), "int8 weight-only (_weight_int8pack_mm)"
        return module, "dense matmul on dequantized weights (no stock kernel for group-wise int8)"
    if kind.endswith("int4") and device.type == "cpu":
        if group_size in INT4_CPU_GROUPS:
            return (Int4WeightLinear(*codes, group_size, bias, weight.dtype),
                    f"int4 weight-only, group {group_size} (_weight_int4pack_mm_for_cpu)")
        return module, (f"dense matmul on dequantized weights (the CPU int4 kernel needs a group size in "
                        f"{INT4_CPU_GROUPS})")
    if kind.startswith("int") or kind.startswith("2:4+int"):
        return module, "dense matmul on dequantized weights (no weight-only int kernel used on this device)"
    if kind == "2:4":
        why = "no 2:4 kernel on CPU in PyTorch" if device.type == "cpu" else "--sparse-kernel dense"
        return module, f"dense matmul over stored zeros ({why})"
    return module, "dense matmul"


# ---------------------------------------------------------------------------------------------
# a whole model in runnable form

def plan_layers(model: nn.Module, folder: str | Path, sparse_kernel: str = "auto", include: list[str] | None = None,
                ignore: list[str] | None = None, fallback: bool = False) -> list[dict]:
    """Per target layer of a compressed model loaded from `folder`: name, (out, in), kind, runnable module,
    backend. `fallback`: a 2:4 layer that the semi-structured kernel refuses (no GPU, float32, a shape the
    kernel does not take) stays as it is, the reason in its backend, instead of raising the SlimlmError."""
    from .. import models
    from ..formats import quantized

    targets = models.find_targets(model, include, ignore)
    spec = getattr(model.config, "slimlm_quant", None)
    codes = quantized.read_codes(Path(folder), spec) if spec else {}
    plan = []
    for name, module in targets.items():
        weight = models.weight_matrix(module)
        bits = {"bits": spec["bits"]} if name in codes else None
        kind = layer_kind(module, bits)
        group = quantized.group_size_of(spec["group_size"]) if bits else None
        try:
            fast, backend = runnable(name, module, kind, sparse_kernel, codes.get(name), group)
        except SlimlmError as err:
            if not fallback:
                raise
            fast, backend = module, f"dense matmul, no 2:4 kernel: {str(err).removeprefix(name + ': ')}"
        plan.append({"name": name, "shape": tuple(weight.shape), "kind": kind, "module": fast, "backend": backend})
    return plan


def to_runnable(model: nn.Module, plan: list[dict]) -> nn.Module:
    """Put the plan's runnable modules in place (in the model itself)."""
    for layer in plan:
        if layer["module"] is not model.get_submodule(layer["name"]):
            replace_module(model, layer["name"], layer["module"])
    return model


def backend_summary(plan: list[dict]) -> str:
    counts: dict[str, int] = {}
    for layer in plan:
        counts[layer["backend"]] = counts.get(layer["backend"], 0) + 1
    return "; ".join(f"{n} layers: {b}" for b, n in counts.items())


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers as held in memory (semi-structured: packed values + metadata)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        parts = [getattr(t, a, None) for a in ("packed", "meta", "packed_t", "meta_t")]
        parts = [p for p in parts if isinstance(p, torch.Tensor)]
        total += sum(p.numel() * p.element_size() for p in parts) if parts else t.numel() * t.element_size()
    return total
