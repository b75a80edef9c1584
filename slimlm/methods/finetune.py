"""Dense fine-tuning (recipe `finetune`): the engine's defaults, nothing compressed. It makes the teacher
that movement pruning and LPAF distil from."""
from __future__ import annotations

from .base import Method, register


@register
class Finetune(Method):
    names = ("finetune",)
