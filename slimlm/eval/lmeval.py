"""An lm-evaluation-harness `LM` backed by whatever `slimlm.models.load` returns.

lm-eval's own HF wrapper loads a checkpoint by name; ours takes the model already in memory, so 2:4
models with SLoRB side paths, low-rank (LPAF) and quantized models are scored exactly as slimlm runs
them, without converting anything. The token-level functions are plain PyTorch and testable alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from tqdm.auto import tqdm

# (context token ids, continuation token ids): score the continuation given the context
Pair = tuple[list[int], list[int]]


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int) -> Pair:
    """Token ids of context and continuation as the model sees them together.

    Tokenizing the two strings separately can split a word differently from tokenizing the whole
    text, so the whole text is encoded and the continuation is what follows the context's tokens.
    Spaces at the end of the context belong to the continuation (" Paris" is one token, "Paris" after
    a separate " " is not). An empty context becomes the prefix token (BOS, else EOS)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if not stripped:
        return [prefix_id], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(stripped + continuation)
    context_ids = tokenizer.encode(stripped)
    return context_ids, whole[len(context_ids):]


def rolling_pairs(ids: list[int], prefix_id: int, max_length: int) -> list[Pair]:
    """Split a document into pairs that predict each of its tokens exactly once, each prediction
    with as much preceding context as fits in `max_length` inputs. The first token is predicted
    from the prefix token alone."""
    seq = [prefix_id] + list(ids)
    pairs, start = [], 1
    while start < len(seq):
        end = min(len(seq), start + max_length)
        first_input = max(0, end - 1 - max_length)
        pairs.append((seq[first_input:start], seq[start:end]))
        start = end
    return pairs


@torch.no_grad()
def score_pairs(model, pairs: list[Pair], max_length: int, batch_size: int = 8,
                progress: bool = False) -> list[tuple[float, bool]]:
    """Log-probability of each continuation given its context, and whether greedy decoding would
    have produced it. Inputs longer than `max_length` lose tokens from the left (the continuation
    is kept). Pairs run longest first in right-padded batches: a causal model's outputs at real
    positions do not depend on padding to their right."""
    device = next(model.parameters()).device
    inputs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", unit="batch",
                      leave=False, disable=not progress):
        batch = order[start : start + batch_size]
        width = len(inputs[batch[0]])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
            mask[row, : len(inputs[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, i in enumerate(batch):
            n, target = len(inputs[i]), torch.tensor(pairs[i][1][-max_length:], device=device)
            logprobs = F.log_softmax(logits[row, n - len(target) : n].float(), dim=-1)
            total = logprobs.gather(1, target.unsqueeze(1)).sum().item()
            results[i] = (total, bool((logprobs.argmax(-1) == target).all()))
    model.train(was_training)
    return results  # type: ignore[return-value]


def _stop_strings(until, eos: str | None) -> list[str]:
    stops = [until] if isinstance(until, str) else list(until or [])
    return stops + ([eos] if eos and eos not in stops else [])


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The generated text up to (not including) the first stop string."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class SlimlmLM(LM):
    """lm-eval model interface over an in-memory causal LM and its tokenizer."""

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 8, max_gen_tokens: int = 256,
                 progress: bool = True):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size, self.max_gen_tokens = max_length, batch_size, max_gen_tokens
        self.progress = progress
        bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
        self.prefix_id = bos if bos is not None else eos
        if self.prefix_id is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a text with")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, ctx, cont, self.prefix_id) for ctx, cont in (r.args for r in requests)]
        return score_pairs(self.model, pairs, self.max_length, self.batch_size, self.progress and not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # all windows of all documents go through one batched pass; then each document sums its own
        pairs, owner = [], []
        for doc, (text,) in enumerate(r.args for r in requests):
            doc_pairs = rolling_pairs(self.tokenizer.encode(text, add_special_tokens=False), self.prefix_id,
                                      self.max_length)
            pairs += doc_pairs
            owner += [doc] * len(doc_pairs)
        scores = score_pairs(self.model, pairs, self.max_length, self.batch_size, self.progress and not disable_tqdm)
        totals = [0.0] * len(requests)
        for doc, (logprob, _) in zip(owner, scores):
            totals[doc] += logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (sampling if a task asks for it), stopped at the task's stop strings,
        in left-padded batches of requests that share their generation settings."""
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_id
        self.model.eval()
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            stops = _stop_strings(kwargs.pop("until", None), self.tokenizer.eos_token)
            new_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_tokens))
            sample = bool(kwargs.pop("do_sample", False)) and (kwargs.get("temperature") or 0) > 0
            sampling = {"do_sample": True, "temperature": kwargs["temperature"]} if sample else {"do_sample": False}
            keep = max(1, self.max_length - new_tokens)
            for start in tqdm(range(0, len(indices), self.batch_size), desc="generate", unit="batch",
                              leave=False, disable=disable_tqdm or not self.progress):
                batch = indices[start : start + self.batch_size]
                contexts = [self.tokenizer.encode(requests[i].args[0])[-keep:] for i in batch]
                width = max(map(len, contexts))
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, ctx in enumerate(contexts):
                    ids[row, width - len(ctx):] = torch.tensor(ctx)
                    mask[row, width - len(ctx):] = 1
                generated = self.model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                    pad_token_id=pad_id, stop_strings=[s for s in stops if s] or None, tokenizer=self.tokenizer,
                    top_p=None, top_k=None, **sampling)
                for row, i in enumerate(batch):
                    text = self.tokenizer.decode(generated[row, width:], skip_special_tokens=False)
                    outputs[i] = cut_at_stop(text, stops)
        return outputs  # type: ignore[return-value]
