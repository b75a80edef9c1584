import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.ops.quant import dequantize, gptq, pack_24, packed_bytes, quant_params, quantize, rtn, unpack_24
from slimlm.ops.sparsity import is_valid_nm, nm_mask


def random_matrix(out, inp, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def calibration(inp, n=512, seed=0):
    """Inputs with correlated columns (X = Z L for a random mixing L), so H = 2 X^T X is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, inp, generator=g)
    L = torch.eye(inp) + torch.randn(inp, inp, generator=g) / inp**0.5
    X = Z @ L
    return X, 2 * X.T @ X


def sparse_24(out, inp, seed=0):
    W = random_matrix(out, inp, seed)
    mask = nm_mask(W.abs(), 2, 4)
    return W * mask, mask


def layer_error(W, Wq, X):
    """||(W - Wq) X^T||^2: how far the layer's outputs on the calibration inputs move."""
    return float(((W - Wq) @ X.T).pow(2).sum())


# ---------------------------------------------------------------------------------------------
# round-to-nearest

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, -1, 32, 128])
def test_rtn_error_is_at_most_half_a_step(bits, group_size):
    W = random_matrix(48, 256, seed=1) * 3
    codes, scales = rtn(W, bits, group_size)
    groups = 1 if group_size in (None, -1) else 256 // group_size
    assert codes.dtype == torch.int8 and codes.shape == W.shape
    assert scales.shape == (48, groups) and scales.dtype == torch.float32
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    # each group's largest |w| lands on the largest positive code (up to its sign)
    assert int(codes.abs().max()) == 2 ** (bits - 1) - 1
    step = scales.repeat_interleave(256 // groups, dim=1)
    assert ((W - dequantize(codes, scales, group_size)).abs() <= step / 2 * (1 + 1e-5)).all()


def test_quantize_and_dequantize_with_given_scales():
    W = torch.tensor([[0.0, 1.0, -2.0, 0.49], [7.0, -7.0, 3.4, 0.0]])
    scales = quant_params(W, 4, 2)
    torch.testing.assert_close(scales, torch.tensor([[1 / 7, 2 / 7], [1.0, 3.4 / 7]]))
    codes = quantize(W, scales, 4, 2)
    assert codes.tolist() == [[0, 7, -7, 2], [7, -7, 7, 0]]
    torch.testing.assert_close(dequantize(codes, scales, 2), codes.float() * scales.repeat_interleave(2, dim=1))
    # values beyond the scale's range clamp to the code range, the negative end one further
    assert quantize(W * 10, scales, 4, 2)[0].tolist() == [0, 7, -8, 7]


def test_all_zero_groups_get_scale_one_and_code_zero():
    W = random_matrix(4, 64, seed=2)
    W[1] = 0
    W[2, :32] = 0
    codes, scales = rtn(W, 8, 32)
    assert scales[1].tolist() == [1.0, 1.0] and scales[2, 0] == 1.0
    assert (codes[1] == 0).all() and (codes[2, :32] == 0).all()
    assert (dequantize(codes, scales, 32)[1] == 0).all()


def test_group_wise_beats_per_channel_on_uneven_columns():
    g = torch.Generator().manual_seed(3)
    col_scale = torch.exp(1.5 * torch.randn(1, 256, generator=g))
    W = torch.randn(64, 256, generator=g) * col_scale
    for bits in (4, 8):
        per_channel = float((W - dequantize(*rtn(W, bits, -1), -1)).pow(2).sum())
        grouped = float((W - dequantize(*rtn(W, bits, 32), 32)).pow(2).sum())
        assert grouped < 0.5 * per_channel


# ---------------------------------------------------------------------------------------------
# exact zeros of the 2:4 pattern

def assert_zeros_survive(W, mask, codes, scales, group_size):
    assert (codes[~mask] == 0).all()
    Wq = dequantize(codes, scales, group_size)
    assert (Wq[~mask] == 0.0).all()
    assert is_valid_nm(Wq, 2, 4) and is_valid_nm(codes, 2, 4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_24_zeros_survive_rtn_and_gptq(bits, group_size):
    W, mask = sparse_24(32, 128, seed=4)
    _, H = calibration(128, seed=5)
    assert_zeros_survive(W, mask, *rtn(W, bits, group_size), group_size)
    assert_zeros_survive(W, mask, *gptq(W, H, bits, group_size), group_size)  # mask inferred as W != 0
    # an explicit mask wins over the weight's zeros: weights under it end up zero too
    dense = random_matrix(32, 128, seed=4)
    assert_zeros_survive(dense, mask, *gptq(dense, H, bits, group_size, mask=mask), group_size)


# ---------------------------------------------------------------------------------------------
# GPTQ

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("sparse", [False, True])
def test_gptq_beats_rtn_on_layer_error(bits, group_size, sparse):
    X, H = calibration(128, seed=6)
    W, _ = sparse_24(64, 128, seed=7) if sparse else (random_matrix(64, 128, seed=7), None)
    rtn_err = layer_error(W, dequantize(*rtn(W, bits, group_size), group_size), X)
    gptq_err = layer_error(W, dequantize(*gptq(W, H, bits, group_size), group_size), X)
    # measured margins: ~0.5x dense, ~0.85x 2:4 (fewer free weights to absorb the error)
    assert gptq_err < (0.95 if sparse else 0.7) * rtn_err


def test_gptq_with_a_diagonal_hessian_is_rtn():
    # no correlation between inputs: nothing to compensate, every column rounds to nearest
    W = random_matrix(32, 96, seed=8)
    H = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(9)) + 0.5)
    for group_size in (-1, 32):
        codes, scales = gptq(W, H, 4, group_size)
        rtn_codes, rtn_scales = rtn(W, 4, group_size)
        assert torch.equal(codes, rtn_codes)
        torch.testing.assert_close(scales, rtn_scales)


def test_gptq_does_not_depend_on_the_block_size():
    # lazy block updates are exact; groups spanning blocks take their scale from the current weights
    X, H = calibration(128, seed=10)
    W = random_matrix(32, 128, seed=11)
    codes, scales = gptq(W, H, 4, 64, block_size=128)
    err = layer_error(W, dequantize(codes, scales, 64), X)
    for block_size in (16, 48):
        c, s = gptq(W, H, 4, 64, block_size=block_size)
        assert float((c == codes).float().mean()) > 0.999
        torch.testing.assert_close(s, scales, rtol=1e-4, atol=1e-6)
        assert layer_error(W, dequantize(c, s, 64), X) == pytest.approx(err, rel=1e-3)


def test_gptq_leaves_inputs_alone_and_handles_dead_inputs():
    X, H = calibration(64, seed=12)
    H[5, :] = 0
    H[:, 5] = 0  # input 5 never active
    W = random_matrix(16, 64, seed=13)
    W0, H0 = W.clone(), H.clone()
    codes, scales = gptq(W, H, 8, 32)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert torch.isfinite(scales).all() and (codes[:, 5] == 0).all()
    with pytest.raises(ValueError, match="Hessian has shape"):
        gptq(W, H[:10, :10], 8, 32)
    with pytest.raises(ValueError, match="mask has shape"):
        gptq(W, H, 8, 32, mask=torch.ones(16, 32, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# packed 2:4 format

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(32, 128), (5, 12)])
def test_pack_24_round_trips(bits, shape):
    W, _ = sparse_24(*shape, seed=14)
    codes, _ = rtn(W, bits, -1)
    codes[0] = 0  # groups with fewer than 2 non-zeros
    codes[1, :4] = torch.tensor([0, 0, 0, -(2 ** (bits - 1))])  # the most negative code
    packed = pack_24(codes, bits)
    assert torch.equal(unpack_24(packed, codes.shape), codes)


@pytest.mark.parametrize("bits,bytes_per_weight", [(4, 3 / 8), (8, 5 / 8)])
def test_packed_size_is_what_the_format_says(bits, bytes_per_weight):
    out, inp = 64, 256
    codes, _ = rtn(sparse_24(out, inp, seed=15)[0], bits, 128)
    packed = pack_24(codes, bits)
    values = out * inp // 2 * bits / 8  # half the weights stored, at `bits` each
    positions = out * inp // 2 * 2 / 8  # a 2-bit index per stored weight
    assert packed_bytes(packed) == values + positions == bytes_per_weight * out * inp
    assert packed["positions"].dtype == torch.uint8
    assert packed["values"].dtype == (torch.uint8 if bits == 4 else torch.int8)


def test_pack_24_layout():
    codes = torch.tensor([[0, 3, 0, -2, 5, 0, 0, 0]], dtype=torch.int8)
    packed = pack_24(codes, 4)
    # positions 1, 3 | 0, 1 (the free slot takes the lowest zero), 2 bits each from the low end
    assert packed["positions"].tolist() == [[1 | 3 << 2 | 0 << 4 | 1 << 6]]
    # values 3, -2 | 5, 0 as nibbles, the earlier one low: -2 -> 0xE
    assert packed["values"].tolist() == [[3 | 0xE << 4, 5]]
    assert pack_24(codes, 8)["values"].tolist() == [[3, -2, 5, 0]]


# ---------------------------------------------------------------------------------------------
# errors a user can cause

def test_bad_bits_and_group_sizes_are_clear_errors():
    W = random_matrix(8, 96)
    for bits in (2, 3, 16):
        with pytest.raises(SlimlmError, match=f"bit width {bits}"):
            rtn(W, bits, 32)
        with pytest.raises(SlimlmError, match=f"bit width {bits}"):
            gptq(W, torch.eye(96), bits, 32)
    with pytest.raises(SlimlmError, match="input width 96 is not divisible by the group size 64"):
        rtn(W, 4, 64)
    with pytest.raises(SlimlmError, match="input width 96 is not divisible by the group size 64"):
        gptq(W, torch.eye(96), 4, 64)
    with pytest.raises(SlimlmError, match="group size 0"):
        quant_params(W, 4, 0)


def test_packing_rejects_codes_that_are_not_24():
    codes, _ = rtn(random_matrix(4, 16, seed=16), 8, -1)  # dense: every group has 3-4 non-zeros
    violating = int(((codes.reshape(4, 4, 4) != 0).sum(-1) > 2).sum())
    with pytest.raises(SlimlmError, match=f"not 2:4 sparse: {violating} groups"):
        pack_24(codes, 8)
    with pytest.raises(SlimlmError, match="input width 10 is not divisible by 4"):
        pack_24(torch.zeros(2, 10, dtype=torch.int8), 8)
    with pytest.raises(SlimlmError, match="outside the 4-bit range"):
        pack_24(torch.tensor([[20, 0, 0, 0]], dtype=torch.int8), 4)
    with pytest.raises(SlimlmError, match="bit width 3"):
        pack_24(torch.zeros(2, 8, dtype=torch.int8), 3)


@pytest.mark.parametrize("bits", [4, 8])
def test_dense_codes_pack_and_unpack_exactly(bits):
    from slimlm.ops.quant import pack_dense, unpack_dense

    W = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    codes, _ = rtn(W, bits, group_size=None)
    packed = pack_dense(codes, bits)
    assert packed.numel() * packed.element_size() == W.numel() * bits // 8
    assert torch.equal(unpack_dense(packed), codes)
