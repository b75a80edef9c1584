"""Pure tensor math for weight quantization: symmetric integer codes (8 or 4 bits) with per-channel or
group-wise scales, round-to-nearest (RTN) and GPTQ, and a packed storage format for 2:4 sparse codes.

Convention: W has shape (out, in). A group is `group_size` consecutive input columns of one row
(group_size None or -1: the whole row, i.e. one scale per output channel); scales have shape
(out, in // group_size). Codes are int8, q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1), and
dequantize to q * scale. The zero-point is 0, so a zero weight gets code 0 and dequantizes to exactly
0.0: the zeros of an N:M pattern survive quantization bit-exactly. Scales are float32.
"""
from __future__ import annotations

import torch

from ..errors import SlimlmError
from ..prune.sparsegpt import inverse_hessian_cholesky

BITS = (4, 8)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise SlimlmError(f"unsupported bit width {bits}: choose 4 or 8")


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _group_width(in_features: int, group_size: int | None) -> int:
    """Columns per group: the whole row for per-channel (None or -1)."""
    if group_size is None or group_size == -1:
        return in_features
    if not isinstance(group_size, int) or group_size < 1:
        raise SlimlmError(f"group size {group_size} is invalid: use a positive number of input columns, "
                          "or -1 for one scale per output channel")
    if in_features % group_size:
        raise SlimlmError(f"input width {in_features} is not divisible by the group size {group_size}: "
                          "choose a group size that divides it, or -1 for one scale per output channel")
    return group_size


def _check_matrix(W: torch.Tensor, name: str = "weight") -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a {name} matrix, got a tensor of shape {tuple(W.shape)}")


def _scale_of(W: torch.Tensor, bits: int) -> torch.Tensor:
    """max |w| along the last dim mapped to the largest positive code; all-zero groups get scale 1
    (any scale would do: their codes are 0)."""
    scale = W.abs().amax(dim=-1) / _qmax(bits)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _codes_of(W: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes round(W / scale) clamped to the b-bit signed range (scale broadcasts against W)."""
    return torch.clamp(torch.round(W / scale), -_qmax(bits) - 1, _qmax(bits))


def quant_params(W: torch.Tensor, bits: int, group_size: int | None = 128) -> torch.Tensor:
    """Scales (out, in // group_size), or (out, 1) per channel, for symmetric RTN of W."""
    _check_matrix(W)
    _check_bits(bits)
    out, width = W.shape
    gs = _group_width(width, group_size)
    return _scale_of(W.detach().float().reshape(out, width // gs, gs), bits)


def _grouped(W: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """W viewed as (out, groups, group_size), checked against the scales' shape."""
    _check_matrix(W)
    out, width = W.shape
    gs = _group_width(width, group_size)
    if scales.shape != (out, width // gs):
        raise ValueError(f"scales have shape {tuple(scales.shape)}, expected {(out, width // gs)} for a "
                         f"{out}x{width} weight with group size {group_size}")
    return W.reshape(out, width // gs, gs)


def quantize(W: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None = 128) -> torch.Tensor:
    """int8 codes of W (same shape) for the given scales."""
    _check_bits(bits)
    grouped = _grouped(W.detach().float(), scales, group_size)
    codes = _codes_of(grouped, scales.float().unsqueeze(-1), bits)
    return codes.to(torch.int8).reshape(W.shape)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None = 128) -> torch.Tensor:
    """codes * scale, in the scales' dtype (float32 from this module)."""
    grouped = _grouped(codes, scales, group_size)
    return (grouped.to(scales.dtype) * scales.unsqueeze(-1)).reshape(codes.shape)


def rtn(W: torch.Tensor, bits: int, group_size: int | None = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes, scales)."""
    scales = quant_params(W, bits, group_size)
    return quantize(W, scales, bits, group_size), scales


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = 128,
         mask: torch.Tensor | None = None, damp: float = 0.01,
         block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2022): quantize the columns of W left to right, spreading each column's
    error over the not-yet-quantized columns with the upper Cholesky factor of (H + damp I)^-1
    (H = 2 X^T X of the layer inputs; damp is a fraction of the mean diagonal). Returns (codes, scales).

    Group scales come from the current, error-updated weights when a group starts; per-channel scales
    from the whole weight up front. `mask` (True = kept; default W != 0) fixes a sparsity pattern:
    pruned entries get code 0. Inputs with H_jj = 0 (never active) get code 0 too.
    Raises torch.linalg.LinAlgError when H + damp I is not positive definite (the caller names the layer).
    """
    _check_matrix(W)
    _check_bits(bits)
    rows, cols = W.shape
    gs = _group_width(cols, group_size)
    per_channel = gs == cols
    if H.shape != (cols, cols):
        raise ValueError(f"the Hessian has shape {tuple(H.shape)}, expected {(cols, cols)} for a "
                         f"{rows}x{cols} weight")
    if block_size < 1:
        raise ValueError(f"block size {block_size} must be positive")
    if mask is None:
        mask = W != 0
    elif mask.shape != W.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight {tuple(W.shape)}")
    keep = mask.to(device=W.device, dtype=torch.float32)

    W = W.detach().float().clone(memory_format=torch.contiguous_format) * keep
    Hinv = inverse_hessian_cholesky(H.detach().float(), W, damp)  # also zeroes dead input columns
    codes = torch.zeros(rows, cols, dtype=torch.int8, device=W.device)
    scales = torch.zeros(rows, cols // gs, dtype=torch.float32, device=W.device)
    if per_channel:
        scales[:, 0] = _scale_of(W, bits)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(i2 - i1):
            col = i1 + i
            if not per_channel and col % gs == 0:
                # The group's current weights: in-block columns as updated so far, and columns past the
                # block with this block's (lazily applied) error so far, so a group may span blocks.
                current = W1[:, i : i + gs]
                if col + gs > i2:
                    rest = W[:, i2 : col + gs] - Err1[:, :i] @ Hinv[i1:col, i2 : col + gs]
                    current = torch.cat([current, rest], dim=1)
                scales[:, col // gs] = _scale_of(current * keep[:, col : col + gs], bits)
            scale = scales[:, col // gs]
            # Pruned entries drift under the updates; quantizing them to 0 here (rather than ignoring
            # them) makes their drift part of this column's error, which the later columns absorb.
            q = _codes_of(W1[:, i] * keep[:, col], scale, bits)
            codes[:, col] = q.to(torch.int8)
            err = (W1[:, i] - q * scale) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales


# ---------------------------------------------------------------------------------------------
# packed 2:4 storage

def _check_24_codes(codes: torch.Tensor, bits: int) -> None:
    _check_bits(bits)
    _check_matrix(codes, "codes")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    out, width = codes.shape
    if width % 4:
        raise SlimlmError(f"input width {width} is not divisible by 4: the packed 2:4 format needs whole "
                          "groups of 4 input columns")
    lo, hi = -_qmax(bits) - 1, _qmax(bits)
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        raise SlimlmError(f"codes range over [{int(codes.min())}, {int(codes.max())}], outside the "
                          f"{bits}-bit range [{lo}, {hi}]: quantize with bits={bits}")
    bad = int(((codes.reshape(out, width // 4, 4) != 0).sum(-1) > 2).sum())
    if bad:
        raise SlimlmError(f"codes are not 2:4 sparse: {bad} groups of 4 input columns hold more than 2 "
                          "non-zeros; prune with the 2:4 pattern before packing")


def pack_24(codes: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Pack 2:4 sparse codes (out, in) into {'values', 'positions'}.

    Every group of 4 input columns keeps exactly 2 slots: its non-zeros, then (if it has fewer) its
    lowest-index zeros, so the 2 positions are distinct; slots are in ascending position order.
    - values: 8-bit: int8 (out, in/2); 4-bit: uint8 (out, in/4), two's complement nibbles, the
      earlier slot in the low nibble.
    - positions: uint8 (out, ceil(in/8)), the 2-bit index (0..3) of each slot within its group,
      four per byte starting at the low bits; the tail of a row's last byte is 0.
    The bit width is recorded by the values' dtype; the shape (and the scales) are stored by the caller.
    """
    _check_24_codes(codes, bits)
    out, width = codes.shape
    groups = codes.to(torch.int8).reshape(out, width // 4, 4)
    idx = torch.arange(4, device=codes.device)
    # non-zeros outrank zeros, lower indices outrank higher: distinct keys, so a deterministic top-2
    key = (groups != 0).to(torch.int64) * 4 + (3 - idx)
    pos = key.topk(2, dim=-1).indices.sort(dim=-1).values
    values = groups.gather(-1, pos).reshape(out, width // 2)
    if bits == 4:
        values = _to_nibbles(values)

    fields = pos.reshape(out, width // 2).to(torch.uint8)
    pad = -fields.shape[1] % 4
    fields = torch.nn.functional.pad(fields, (0, pad)).reshape(out, -1, 4)
    positions = fields[..., 0] | (fields[..., 1] << 2) | (fields[..., 2] << 4) | (fields[..., 3] << 6)
    return {"values": values.contiguous(), "positions": positions.contiguous()}


def unpack_24(packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """int8 codes of the given (out, in) shape from pack_24's output."""
    out, width = shape
    values, positions = packed["values"], packed["positions"]
    if width % 4:
        raise SlimlmError(f"input width {width} is not divisible by 4: not a packed 2:4 shape")
    if values.dtype == torch.int8:
        expected_values = (out, width // 2)
    elif values.dtype == torch.uint8:
        expected_values = (out, width // 4)
    else:
        raise ValueError(f"packed values must be int8 (8-bit) or uint8 (4-bit), got {values.dtype}")
    expected_positions = (out, (width // 2 + 3) // 4)
    if values.shape != expected_values or positions.shape != expected_positions:
        raise ValueError(f"packed values {tuple(values.shape)} / positions {tuple(positions.shape)} do not "
                         f"fit shape {tuple(shape)}: expected {expected_values} / {expected_positions}")

    if values.dtype == torch.uint8:
        values = _from_nibbles(values)
    p = positions.to(torch.int64)
    fields = torch.stack([(p >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).reshape(out, -1)[:, : width // 2]

    codes = torch.zeros(out, width // 4, 4, dtype=torch.int8, device=values.device)
    codes.scatter_(-1, fields.reshape(out, width // 4, 2), values.reshape(out, width // 4, 2))
    return codes.reshape(out, width)


def packed_bytes(packed: dict[str, torch.Tensor]) -> int:
    """Storage size of the packed tensors in bytes."""
    return sum(t.numel() * t.element_size() for t in packed.values())


def _to_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int8 4-bit codes (rows of even length) -> uint8, two per byte, the earlier in the low nibble."""
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8).reshape(values.shape[0], -1, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4)


def _from_nibbles(packed: torch.Tensor) -> torch.Tensor:
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int16)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of a dense (not 2:4) matrix: int8 as they are for 8 bits, two per byte for 4 bits."""
    _check_bits(bits)
    if bits == 8:
        return codes.to(torch.int8).contiguous()
    if codes.shape[1] % 2:
        raise SlimlmError(f"input width {codes.shape[1]} is odd: 4-bit codes are stored two per byte")
    return _to_nibbles(codes).contiguous()


def unpack_dense(values: torch.Tensor) -> torch.Tensor:
    return values if values.dtype == torch.int8 else _from_nibbles(values)
