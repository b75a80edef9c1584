import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model
from slimlm.data import TokenStream, bos_mode, calibration_windows, eval_windows, tokenize
from slimlm.errors import SlimlmError
from slimlm.eval.perplexity import perplexity


def test_perplexity_matches_an_independent_computation():
    model = build_model("llama")
    ids = torch.randint(0, 384, (1000,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, TokenStream(ids, "random", False), seqlen=128)
    assert result["windows"] == 7 and result["tokens_scored"] == 7 * 127
    # independent: per-token log-softmax, gather, average, over the same 7 windows
    nlls = []
    with torch.no_grad():
        for w in ids[: 7 * 128].reshape(7, 128):
            logp = F.log_softmax(model(w[None]).logits[0].double(), -1)
            nlls += [-logp[t, w[t + 1]].item() for t in range(127)]
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_random_model_perplexity_is_near_vocab_size():
    """A freshly initialised model predicts roughly uniformly: perplexity close to |V|."""
    model = build_model("gpt2")
    ids = torch.randint(0, 384, (2048,), generator=torch.Generator().manual_seed(1))
    ppl = perplexity(model, TokenStream(ids, "random", False), seqlen=256)["perplexity"]
    assert 0.8 * 384 < ppl < 1.2 * 384


def test_windows_protocol():
    stream = TokenStream(torch.arange(1050), "x", False)
    w = eval_windows(stream, 100)
    assert w.shape == (10, 100) and w[1, 0] == 100  # non-overlapping, remainder dropped
    c1 = calibration_windows(stream, 5, 100, seed=0)
    c2 = calibration_windows(stream, 5, 100, seed=0)
    c3 = calibration_windows(stream, 5, 100, seed=1)
    assert torch.equal(c1, c2) and not torch.equal(c1, c3)
    assert ((c1[:, 1:] - c1[:, :-1]) == 1).all()  # contiguous windows of the stream


def test_too_short_data_is_a_clear_error():
    stream = TokenStream(torch.arange(50), "short.txt", False)
    with pytest.raises(SlimlmError, match="short.txt.*50 tokens.*--seqlen"):
        eval_windows(stream, 100)
    with pytest.raises(SlimlmError, match="short.txt"):
        calibration_windows(stream, 4, 50, seed=0)


def test_tokenize_records_bos(tokenizer):
    s = tokenize(tokenizer, "We the people", "inline")
    assert s.ids.dim() == 1 and s.ids.numel() > 0
    assert s.bos_added is False


def test_bos_per_window_predicts_every_text_token_once_after_a_bos():
    text = torch.arange(10, 1010)  # 1000 text tokens after the tokenizer's BOS (id 1)
    stream = TokenStream(torch.cat([torch.tensor([1]), text]), "x", bos_added=True, bos_id=1)
    w = eval_windows(stream, 100, bos="window")
    assert w.shape == (10, 100) and (w[:, 0] == 1).all()
    assert torch.equal(w[:, 1:].flatten(), text[: 10 * 99])  # text continues window to window, nothing skipped
    assert bos_mode(stream, "auto") == "window"
    plain = TokenStream(text, "y", bos_added=False, bos_id=1)
    assert bos_mode(plain, "auto") == "stream" and bos_mode(plain, "window") == "window"
    with pytest.raises(SlimlmError, match="has no BOS token"):
        bos_mode(TokenStream(text, "z", False, None), "window")


def test_perplexity_records_its_bos_protocol_and_the_bos_changes_the_number():
    model = build_model("llama")
    ids = torch.randint(5, 384, (1000,), generator=torch.Generator().manual_seed(0))
    stream = TokenStream(torch.cat([torch.tensor([0]), ids]), "random", bos_added=True, bos_id=0)
    per_window = perplexity(model, stream, seqlen=100)
    paper = perplexity(model, stream, seqlen=100, bos="stream")
    assert per_window["bos"] == "window" and paper["bos"] == "stream"
    assert per_window["tokens_scored"] == paper["tokens_scored"] == 10 * 99
    assert per_window["perplexity"] != paper["perplexity"]
    assert "every window starts with BOS" in per_window["protocol"]
