"""slimlm: make language models small by pruning and retraining them.

The Python API (docs/python-api.md); importing slimlm stays cheap, each function imports what it needs:

- slimlm.oneshot(model, tokenizer, method="wanda", sparsity="2:4", calib=...): prune in place, as `slimlm prune`
- slimlm.factorize(model, keep=0.25, init="svd" | "fisher" | "sparsity-aware", data=...): low-rank layers
- slimlm.load(path, runtime=False): a slimlm output folder; runtime=True puts the fast kernels in place
- slimlm.save(model, path, tokenizer): a folder slimlm.load reads back
- slimlm.load_tokenizer(path): the tokenizer of any model slimlm loads (built-in names and .gguf files too)
"""
from .version import __version__  # noqa: F401
__all__ = ["factorize", "load", "load_tokenizer", "oneshot", "save"]


def load(path: str, dtype: str = "float32", device: str = "cpu", runtime: bool = False):
    """Load a slimlm output folder (or any model slimlm accepts) as a transformers model; with
    runtime=True its compressed layers run on fast kernels where there are some (see slimlm.api.load)."""
    from .api import load as _load

    return _load(path, dtype=dtype, device=device, runtime=runtime)


def __getattr__(name: str):
    """slimlm.oneshot (slimlm/pruning.py), slimlm.factorize, slimlm.save, slimlm.load_tokenizer, imported
    when first used."""
    import importlib

    if name == "oneshot":
        return importlib.import_module(".pruning", __name__).oneshot
    if name in ("factorize", "save"):
        return getattr(importlib.import_module(".api", __name__), name)
    if name == "load_tokenizer":
        return importlib.import_module(".models", __name__).load_tokenizer
    raise AttributeError(f"module 'slimlm' has no attribute '{name}'")
