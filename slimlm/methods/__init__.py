"""Training methods, one object each, found by recipe name: `get(name)`; `register(cls)` adds one
(docs/adding-a-method.md). Importing this package registers the built-in methods."""
from .base import REGISTRY, Method, RunContext, get, register
from . import ast, finetune, lpaf, movement

__all__ = ["Method", "RunContext", "REGISTRY", "get", "register"]
