"""Block-by-block calibration gives every block the arguments it receives in the model's own forward:
on models whose layers differ (Gemma-2/3 alternate sliding-window and global attention, Gemma-3 with a
RoPE base per layer type, Qwen2 with max_window_layers) the first block's mask and rotary embeddings
are wrong for the others."""
import pytest
import torch
import transformers

from conftest import VOCAB
from slimlm.models import find_blocks, find_targets, weight_matrix
from slimlm.ops.sparsity import is_valid_nm, parse_sparsity
from slimlm.prune import prune
from slimlm.prune.blockwise import capture_block_inputs, run_block

SEQLEN, WINDOW = 32, 8  # the sliding window is shorter than the calibration windows
ALTERNATING = ["sliding_attention", "full_attention"] * 2


def layered_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=8, sliding_window=WINDOW, layer_types=ALTERNATING)
    if family == "gemma3":  # global layers use rope_theta 1e6, sliding ones 1e4
        return transformers.Gemma3TextConfig(**common, head_dim=8, sliding_window=WINDOW, layer_types=ALTERNATING)
    if family == "qwen2":  # the first max_window_layers layers attend globally, the others in a window
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
    if family == "mistral":  # one sliding window for every layer
        return transformers.MistralConfig(**common, sliding_window=WINDOW)
    raise ValueError(family)


def layered_model(family: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(layered_config(family)).eval()


def windows(n=3, seed=0):
    return torch.randint(5, VOCAB, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def full_model_block_outputs(model, batch):
    """Each block's output in the model's own forward, per window."""
    _, blocks = find_blocks(model)
    outputs = [[] for _ in blocks]
    handles = [b.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out[0] if isinstance(out, tuple) else out))
               for i, b in enumerate(blocks)]
    try:
        for window in batch:
            model(input_ids=window.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outputs


@torch.no_grad()
def blockwise_outputs(model, batch, first_blocks_arguments=False):
    """Each block's output when the blocks run one at a time on captured inputs, as calibration runs them;
    `first_blocks_arguments`: the old behaviour, block 0's mask and rotary embeddings for every block."""
    _, blocks = find_blocks(model)
    hidden, calls = capture_block_inputs(model, blocks, batch)
    outputs = []
    for index, block in enumerate(blocks):
        runs = calls[0] if first_blocks_arguments else calls[index]
        hidden = [run_block(block, h, a, k) for h, (a, k) in zip(hidden, runs)]
        outputs.append(hidden)
    return outputs


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen2", "mistral"])
def test_each_block_gets_its_own_inputs(family):
    model = layered_model(family)
    batch = windows()
    reference = full_model_block_outputs(model, batch)
    ours = blockwise_outputs(model, batch)
    for index, (want, got) in enumerate(zip(reference, ours)):
        for w, g in zip(want, got):
            assert torch.equal(w, g), f"block {index}"
    old = blockwise_outputs(model, batch, first_blocks_arguments=True)
    differs = [any(not torch.allclose(w, g, atol=1e-4) for w, g in zip(want, got)) for want, got in zip(reference, old)]
    if family == "mistral":  # every layer has the same mask and RoPE: the old behaviour was right here
        assert not any(differs)
    else:  # the first differing block is the first one whose layer type differs from block 0's
        types = model.config.layer_types
        first_other = next(i for i, t in enumerate(types) if t != types[0])
        assert differs.index(True) == first_other


def test_arguments_are_stored_once_per_layer_type():
    model = layered_model("gemma3")
    _, blocks = find_blocks(model)
    hidden, calls = capture_block_inputs(model, blocks, windows(4))
    assert len(hidden) == 4 and all(len(c) == 4 for c in calls)
    masks = {id(k["attention_mask"]) for block in calls for _, k in block}
    rope = {id(k["position_embeddings"][0]) for block in calls for _, k in block}
    assert len(masks) <= 2 and len(rope) == 2  # windows of one length share them; one per layer type
    assert all("forward" not in b.__dict__ for b in blocks)  # the stand-ins are gone


def test_capture_stops_before_the_lm_head():
    model = layered_model("gemma2")
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    capture_block_inputs(model, find_blocks(model)[1], windows(2))
    assert not calls


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_pruning_on_alternating_layers(method):
    model = layered_model("gemma2")
    targets = find_targets(model)
    prune(model, targets, method, parse_sparsity("2:4"), windows(4))
    assert all(is_valid_nm(weight_matrix(m), 2, 4) for m in targets.values())


class _TupleBlock(torch.nn.Module):
    """A block as transformers < 5 wrote them: returns a tuple, takes a per-layer keyword argument."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, hidden, scale=None):
        return (self.linear(hidden) * scale, None)


class _TupleModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.layers = torch.nn.ModuleList(_TupleBlock() for _ in range(3))

    def forward(self, input_ids, **kwargs):
        hidden = self.embed(input_ids)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, scale=torch.tensor(float(index + 1)))[0]
        return hidden


def test_blocks_that_return_tuples():
    torch.manual_seed(0)
    model = _TupleModel().eval()
    batch = windows()
    ours = blockwise_outputs(model, batch)
    reference = full_model_block_outputs(model, batch)
    assert all(torch.equal(w, g) for want, got in zip(reference, ours) for w, g in zip(want, got))
