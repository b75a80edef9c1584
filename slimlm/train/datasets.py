"""What the engine trains on: a fixed list of examples, any batch of which is a dict of tensors.

- `Windows`: a causal LM's packed, non-overlapping token windows ({"input_ids"}).
- `Classified`: padded labeled texts ({"input_ids", "attention_mask", "labels"}).
Validation data also says how it is scored: perplexity for text, accuracy for labeled examples.
"""
from __future__ import annotations

import torch

from ..data import LabeledExamples, TokenStream, window_count
from ..eval.perplexity import accuracy, perplexity


class Windows:
    """Window i is tokens [i * seqlen, (i + 1) * seqlen) of the stream, the remainder dropped. Windows are
    cut when asked for, so a memory-mapped corpus of any size is never copied whole."""
    metric = "val_ppl"

    def __init__(self, stream: TokenStream, seqlen: int):
        self.stream, self.seqlen = stream, seqlen
        self.count = window_count(stream, len(stream), seqlen, seqlen)
        self.source = stream.source

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.stream.window(index * self.seqlen, self.seqlen)

    def get(self, indices: list[int]) -> dict:
        return {"input_ids": torch.stack([self[i] for i in indices])}

    def score(self, model, max_batches: int | None) -> float:
        return perplexity(model, self.stream, self.seqlen, max_windows=max_batches)["perplexity"]


class Classified:
    metric = "val_acc"

    def __init__(self, examples: LabeledExamples):
        self.examples = examples
        self.source = examples.source

    def __len__(self) -> int:
        return len(self.examples.labels)

    def get(self, indices: list[int]) -> dict:
        e = self.examples
        return {"input_ids": e.input_ids[indices], "attention_mask": e.attention_mask[indices], "labels": e.labels[indices]}

    def score(self, model, max_batches: int | None) -> float:
        """Accuracy over every validation example (max_batches limits text windows only)."""
        return accuracy(model, self.examples)["accuracy"]


def as_dataset(data, seqlen: int):
    if isinstance(data, TokenStream):
        return Windows(data, seqlen)
    if isinstance(data, LabeledExamples):
        return Classified(data)
    return data


def sample_batches(dataset, count: int, batch_size: int, seed: int, device) -> list[dict]:
    """`count` batches of distinct examples drawn with the seed (e.g. for Fisher information)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return [to_device(dataset.get(order[i * batch_size:(i + 1) * batch_size]), device)
            for i in range(min(count, len(dataset) // batch_size))]


def tokens_in(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
