"""Logit distillation from a frozen dense teacher: alpha * T^2 * KL + (1 - alpha) * CE.

For a causal LM the distributions are next-token distributions (per token); for a classifier, the
class distribution (per example). Logit KL only: METHODS.md (AST) found intermediate-layer losses harmful.

Memory: for a causal LM the loss is computed `chunk_tokens` tokens at a time (recipe key
method.distill.chunk_tokens; 0 = the full path). Student and teacher run their bodies to the last
hidden states; the LM heads are applied per chunk of tokens, and each chunk's CE and KL are
differentiated at once (the chunk's logits are freed before the next chunk), so neither model's
B x T x V logits, log-softmaxes or their gradients ever exist in full. The chunked loss is the full
one summed in another order (equal to float tolerance, gradients too). The full path stays for
classifiers, FSDP-sharded models (the head's parameters are sharded outside the forward), and models
whose logits are not head(hidden) (with Gemma-2's final soft-capping reproduced): checked once per
model on a few tokens.
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F

from .. import models
from ..errors import SlimlmError
from .engine import logits_of, predicted, task_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            kind: str = "forward") -> torch.Tensor:
    """T^2 * KL per predicted distribution. forward: KL(p_teacher || p_student); reverse: KL(p_student || p_teacher)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    if kind == "forward":
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    else:
        kl = F.kl_div(t, s, log_target=True, reduction="batchmean")
    return kl * temperature**2


def make_teacher(model, d: dict, bf16: bool, tokenizer=None):
    """The frozen dense teacher: a copy of the starting model (default) or another model with the same
    outputs (vocabulary or classes). Call before the student is changed. `bf16`: whether training runs
    in bf16 autocast; the teacher's dtype 'auto' follows it (a bf16 teacher forward is about 2x faster,
    and its logits feed a bf16-computed loss anyway)."""
    name = d["teacher_dtype"] if d["teacher_dtype"] != "auto" else ("bfloat16" if bf16 else "float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    if d["teacher"] is None:
        _refuse_pruned_start(model)
        teacher = copy.deepcopy(model)
    else:
        loaded = models.load(d["teacher"], device=str(next(model.parameters()).device))
        teacher = loaded.model
        t_out, s_out = _outputs(teacher), _outputs(model)
        if t_out != s_out:
            raise SlimlmError(f"teacher '{d['teacher']}' has {t_out} outputs (vocabulary or classes), the student "
                              f"{s_out}: distillation compares their distributions, use a teacher with the "
                              "student's tokenizer (or label set)")
        # as many outputs is not enough: token i must be the same token for both (`tokenizer`: the student's)
        if tokenizer is not None and hasattr(tokenizer, "get_vocab") and \
                loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SlimlmError(f"teacher '{d['teacher']}' has {t_out} outputs like the student, but another "
                              "tokenizer (its tokens are numbered differently): distillation compares "
                              "distributions token by token; use a teacher with the student's tokenizer")
    return teacher.to(dtype).eval().requires_grad_(False)


def _refuse_pruned_start(model, limit: float = 0.25) -> None:
    """The default teacher is a copy of the starting model: a start that is already pruned (a `slimlm
    prune` output, say) would teach its own pruned outputs, KL 0 from step 1. A trained dense model has
    almost no exact zeros, so a quarter of the block weights being zero means it was pruned."""
    weights = [models.weight_matrix(m) for m in models.find_targets(model).values()]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    if zeros >= limit:
        raise SlimlmError(f"the starting model is already pruned ({zeros:.0%} of its block weights are zero): as its "
                          "own teacher it would teach the pruned model (KL 0 from the first step). Start from the "
                          "dense model with a one-shot mask (model=DENSE method.init=wanda), or name the dense "
                          "teacher (method.distill.teacher=DENSE)")


def _outputs(model) -> int:
    head = model.get_output_embeddings()
    return head.out_features if head is not None else model.config.num_labels


def distill_loss(model, teacher, batch: dict, d: dict) -> tuple[torch.Tensor, dict]:
    """The training loss of a distilling method, and its parts to log. Without a teacher: plain CE."""
    if teacher is not None and d.get("chunk_tokens", 0) > 0 and "labels" not in batch:
        student_head, teacher_head = _lm_head(model, batch), _lm_head(teacher, batch)
        if student_head is not None and teacher_head is not None:
            return chunked_distill_loss(model, teacher, student_head, teacher_head, batch, d)
    logits = logits_of(model, batch)
    ce = task_loss(logits, batch)
    if teacher is None:
        return ce, {"ce": ce.item()}
    with torch.no_grad():
        teacher_logits = logits_of(teacher, batch)
    kl = kd_loss(predicted(logits, batch), predicted(teacher_logits, batch), d["temperature"], d["kl"])
    return d["alpha"] * kl + (1 - d["alpha"]) * ce, {"ce": ce.item(), "kl": kl.item()}


# -- chunked distillation ------------------------------------------------------------------------------

_HEADS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its head function, or None


def _inner(model):
    return getattr(model, "module", model)  # DDP wraps the model


def _soft_capped(head, cap):
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap  # Gemma-2/3: final_logit_softcapping, as the model does


def _lm_head(model, batch: dict):
    """The function hidden -> logits of a causal LM whose logits are exactly head(last hidden state)
    (with soft-capping where the config sets it), or None where the full path must be used: no head,
    no base model, a FSDP-sharded model, or logits that the reproduced head does not match (checked
    once per model, on one forward of a few tokens)."""
    inner = _inner(model)
    if inner in _HEADS:
        return _HEADS[inner]
    from .distributed import is_fully_sharded

    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    body = getattr(inner, "base_model", inner)
    fn = None
    if head is not None and body is not inner and not is_fully_sharded(inner):
        fn = _soft_capped(head, getattr(inner.config, "final_logit_softcapping", None))
        try:
            with torch.no_grad():
                hidden, out = _run_body(inner, batch["input_ids"][:1, :8], keep_all=True)
                ref, mine = out.logits.float(), fn(hidden).float()
        except (TypeError, _NoBody):  # no logits_to_keep argument, or the forward bypasses base_model (OPT)
            ref = mine = None
        if ref is None or ref.shape != mine.shape or (ref - mine).abs().max() > 1e-3 * ref.abs().max() + 1e-6:
            fn = None
    _HEADS[inner] = fn
    return fn


def _run_body(model, input_ids, keep_all: bool = False):
    """The last hidden state (the base model's output) of `input_ids`, and with `keep_all` the model's
    own output too (all logits). A wrapped model (DDP) runs through its wrapper, which must see the
    forward, with the base model's output caught by a hook and the head run on one position only."""
    inner = _inner(model)
    if model is inner and not keep_all:
        return inner.base_model(input_ids=input_ids, use_cache=False)[0], None
    captured = []
    handle = inner.base_model.register_forward_hook(lambda m, args, out: captured.append(out[0]))
    try:
        # an index tensor, not 1: a strided slice would make the head expand its weight per example
        keep = 0 if keep_all else torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep)
    finally:
        handle.remove()
    if not captured:
        raise _NoBody
    return captured[-1], out


class _NoBody(Exception):
    """The model's forward does not run its `base_model` (OPT runs `model.decoder`): no chunked head for it."""


class _ChunkedLoss(torch.autograd.Function):
    """sum over row chunks of `loss_of(rows, hidden[rows])`, differentiated chunk by chunk in the forward
    (nothing of a chunk is kept but the gradients of `hidden` and `params`, which backward scales)."""

    @staticmethod
    def forward(ctx, loss_of, chunk, hidden, *params):
        want_h, want_p = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        wrt_p = [p for p, w in zip(params, want_p) if w]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_p = [torch.zeros_like(p, dtype=torch.float32) for p in wrt_p]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(want_h)
                loss = loss_of(rows, h)
                wrt = ([h] if want_h else []) + wrt_p
                grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else []
            total += loss.detach()
            if want_h:
                grad_h[rows] = grads[0]
                grads = grads[1:]
            for acc, g in zip(grad_p, grads):
                if g is not None:
                    acc += g
        ctx.save_for_backward(*([grad_h] if want_h else []), *grad_p)
        ctx.want_h, ctx.want_p, ctx.dtypes = want_h, want_p, [p.dtype for p in wrt_p]
        return total

    @staticmethod
    def backward(ctx, g):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * g if ctx.want_h else None
        grad_p = iter(s * g for s in saved)
        dtypes = iter(ctx.dtypes)
        return None, None, grad_h, *(next(grad_p).to(next(dtypes)) if w else None for w in ctx.want_p)


def chunked_distill_loss(model, teacher, student_head, teacher_head, batch: dict, d: dict) -> tuple[torch.Tensor, dict]:
    """distill_loss of a causal LM, `d["chunk_tokens"]` predicted tokens at a time (see the module doc)."""
    ids = batch["input_ids"]
    hidden, _ = _run_body(model, ids)
    with torch.no_grad():
        teacher_hidden, _ = _run_body(teacher, ids)
    hidden, teacher_hidden = hidden[:, :-1].flatten(0, 1), teacher_hidden[:, :-1].flatten(0, 1)
    targets = ids[:, 1:].flatten()
    n, T, alpha = targets.numel(), d["temperature"], d["alpha"]
    sums = {"ce": [], "kl": []}

    def loss_of(rows, h):
        logits = student_head(h).float()  # once: kd_loss's .float() is then a no-op
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden[rows])
        ce = F.cross_entropy(logits, targets[rows], reduction="sum")
        kl = kd_loss(logits, teacher_logits, T, d["kl"]) * logits.shape[0]  # batchmean -> sum
        sums["ce"].append(ce.detach())
        sums["kl"].append(kl.detach())
        return (alpha * kl + (1 - alpha) * ce) / n

    params = [p for p in _inner(model).get_output_embeddings().parameters()]
    loss = _ChunkedLoss.apply(loss_of, d["chunk_tokens"], hidden, *params)
    return loss, {k: float(sum(v)) / n for k, v in sums.items()}
