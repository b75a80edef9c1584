"""Token perplexity: non-overlapping windows (the SparseGPT/Wanda protocol), with a BOS token at the start
of every window for models whose tokenizer adds one (`data.bos_mode`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import TokenStream, bos_mode, eval_windows


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "eval") -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over all windows, and the number of predicted tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total, count


def perplexity(model, stream: TokenStream, seqlen: int, max_windows: int | None = None,
               batch_size: int = 1, bos: str = "auto") -> dict:
    """exp(mean token NLL) over non-overlapping windows (remainder dropped); each window is scored
    independently, so its first token is context only. `bos`: see data.bos_mode. Returns the number with
    its full protocol."""
    bos = bos_mode(stream, bos)
    windows = eval_windows(stream, seqlen, max_windows, bos)
    was_training = model.training
    model.eval()
    nll, count = window_nll(model, windows, batch_size)
    model.train(was_training)
    return {
        "perplexity": math.exp(nll / count),
        "mean_nll": nll / count,
        "data": stream.source,
        "seqlen": seqlen,
        "windows": len(windows),
        "tokens_scored": count,
        "tokens_total": int(stream.ids.numel()),
        "bos_added": stream.bos_added,
        "bos": bos,
        "protocol": "non-overlapping windows, remainder dropped, exp(mean next-token NLL)"
                    + ("; every window starts with BOS" if bos == "window" else "; BOS only where the tokenizer put it"),
    }


@torch.no_grad()
def accuracy(model, examples, batch_size: int = 64, max_examples: int | None = None) -> dict:
    """Classification accuracy of a sequence-classification model on labeled examples."""
    device = next(model.parameters()).device
    n = len(examples.labels) if max_examples is None else min(max_examples, len(examples.labels))
    was_training = model.training
    model.eval()
    correct = 0
    for start in tqdm(range(0, n, batch_size), desc="accuracy", unit="batch", leave=False):
        end = min(n, start + batch_size)
        logits = model(input_ids=examples.input_ids[start:end].to(device),
                       attention_mask=examples.attention_mask[start:end].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == examples.labels[start:end]).sum())
    model.train(was_training)
    return {"accuracy": correct / n, "correct": correct, "examples": n, "data": examples.source,
            "labels": list(examples.names)}
