"""Chunked distillation (issue 19): the loss computed chunk_tokens tokens at a time equals the full
one, and so do its gradients, for student and teacher alike."""
import copy

import pytest
import torch
import transformers

from conftest import VOCAB, build_model
from slimlm.train import distill

D = {"alpha": 0.67, "temperature": 2.0, "kl": "forward", "chunk_tokens": 0}


def _loss_and_grads(model, teacher, batch, d, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, parts = distill.distill_loss(model, teacher, batch, d)
    loss.backward()
    return loss.detach(), parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(arch="llama", perturb=0.05, **kw):
    teacher = build_model(arch, seed=0, **kw)
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():  # a student that differs from its teacher (KL > 0)
        for p in student.parameters():
            p.add_(perturb * torch.randn_like(p))
    return student, teacher.requires_grad_(False)


def _compare(student, teacher, d, chunk, autocast=False, rtol=1e-4):
    batch = {"input_ids": torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))}
    full_loss, full_parts, full_grads = _loss_and_grads(student, teacher, batch, {**d, "chunk_tokens": 0}, autocast)
    loss, parts, grads = _loss_and_grads(student, teacher, batch, {**d, "chunk_tokens": chunk}, autocast)
    assert distill._HEADS.get(student) is not None  # the chunked path ran
    assert loss.item() == pytest.approx(full_loss.item(), rel=rtol)
    for k in ("ce", "kl"):
        assert parts[k] == pytest.approx(full_parts[k], rel=rtol, abs=1e-6)
    assert grads.keys() == full_grads.keys()
    for name, g in full_grads.items():
        if autocast:  # bf16 logits: the full path rounds CE's and KL's gradients to bf16 apart, the chunks their sum
            assert (grads[name] - g).norm() <= 2e-2 * g.norm(), name
        else:
            torch.testing.assert_close(grads[name], g, rtol=rtol * 10, atol=1e-6, msg=name)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("chunk", [5, 16, 1000])  # uneven chunks, one chunk per row of 16, all at once
def test_chunked_equals_full(kl, chunk):
    student, teacher = _pair()
    _compare(student, teacher, {**D, "kl": kl}, chunk)


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (1.0, 3.0), (0.3, 0.5)])
def test_chunked_alpha_temperature(alpha, temperature):
    student, teacher = _pair()
    _compare(student, teacher, {**D, "alpha": alpha, "temperature": temperature}, 7)


def test_chunked_untied_head_and_bf16_autocast():
    student, teacher = _pair("mistral")  # an untied lm_head
    assert student.get_output_embeddings().weight is not student.get_input_embeddings().weight
    _compare(student, teacher, D, 8)
    _compare(student, teacher.to(torch.bfloat16), D, 8, autocast=True, rtol=2e-2)


def test_chunked_soft_capped_head():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=512, final_logit_softcapping=0.5)
    teacher = transformers.AutoModelForCausalLM.from_config(config).eval()
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _compare(student, teacher.requires_grad_(False), D, 6)


def test_unreproducible_head_falls_back_to_full():
    """A model whose logits are not head(hidden) (Granite divides by logits_scaling): the full path."""
    student, teacher = _pair()

    student.register_forward_hook(lambda m, a, out: out.__setitem__("logits", out.logits * 4.0) or out)
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 9))}
    loss, _ = distill.distill_loss(student, teacher, batch, {**D, "chunk_tokens": 4})
    assert distill._HEADS[student] is None
    full, _ = distill.distill_loss(student, teacher, batch, D)
    assert loss.item() == pytest.approx(full.item())



def test_classifier_keeps_full_path():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long),
             "labels": torch.tensor([0, 2])}
    full, _ = distill.distill_loss(model, copy.deepcopy(model), batch, D)
    chunked, _ = distill.distill_loss(model, copy.deepcopy(model), batch, {**D, "chunk_tokens": 4})
    assert chunked.item() == pytest.approx(full.item())
    assert model not in distill._HEADS
