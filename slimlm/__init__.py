"""slimlm: make language models small by pruning and retraining them."""
__version__ = "0.1.0"


def load(path: str, dtype: str = "float32", device: str = "cpu"):
    """Load a slimlm output folder (or any model slimlm accepts) as a transformers model."""
    from .models import load as _load

    return _load(path, dtype=dtype, device=device).model
