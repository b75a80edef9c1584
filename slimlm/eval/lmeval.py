"""lm-evaluation-harness's own HF model (`HFLM`) over the model slimlm loaded, as it is in memory.

HFLM takes an in-memory `PreTrainedModel`, so 2:4 models with SLoRB side paths (forward hooks),
low-rank (LPAF) layers and dequantized quantized models are scored exactly as slimlm runs them,
with nothing reloaded by name. On the same models and requests it gave the same numbers as the
adapter slimlm had before, bit for bit (docs/evaluation.md), with one exception, kept here.
"""
from __future__ import annotations

import logging

import torch
from lm_eval.models.huggingface import HFLM


class SlimlmHFLM(HFLM):
    """HFLM, except that a perplexity document (`loglikelihood_rolling`) is tokenized without the
    tokenizer's special tokens. lm-eval 0.4.13 lets the tokenizer add its BOS there, and then also
    conditions the first window on the BOS prefix token, so with a tokenizer that adds BOS
    (LLaMA-2/3, Mistral, Gemma; not SmolLM2 or GPT-2) log p(BOS | BOS) is scored as part of the
    document (measured: about -5.6 nats per document on the tests' tiny LLaMA). Here every token of
    the document is predicted exactly once, as HFLM did before it left BOS to the tokenizer (lm-eval
    PR #3347) and as slimlm's earlier adapter did."""

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        saved, self.add_bos_token = self.add_bos_token, False  # tok_encode: add_special_tokens=False
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self.add_bos_token = saved


def make_lm(model, tokenizer, max_length: int, batch_size: int | str = 8) -> HFLM:
    """The lm-eval model for `model` as loaded (its device and dtype). `max_length` is the longest
    input (longer ones lose tokens from the left); `batch_size` an int or "auto" (HFLM's search for
    the largest batch that fits, from 64 down). Log-softmax runs in float32 whatever the model's
    dtype, so bfloat16/float16 models are scored as precisely as their logits allow."""
    quiet = logging.getLogger("lm_eval.models.huggingface")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "`pretrained` model kwarg is not of type `str`...": that is the point
    try:
        return SlimlmHFLM(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=max_length,
                          batch_size=batch_size, softmax_dtype=torch.float32)
    finally:
        quiet.setLevel(level)
