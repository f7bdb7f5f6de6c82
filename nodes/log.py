"""The node's log: each message once per patch, never written while torch.compile traces the model.

Every message starts with the node's name, so a user finds it in ComfyUI's console among other packs' lines.
"""
from __future__ import annotations

import logging
from typing import Hashable, List, Set, Tuple

from ..attention.backends.base import tracing

logger = logging.getLogger("efficient_attention_pop")

NODE_NAME = "Efficient Attention (PoP)"
REGIONAL_NODE_NAME = "Regional Prompts (PoP)"


class OnceLog:
    """Messages keyed by what they are about; a key is logged once. While torch.compile traces (where a log call
    would break the graph) messages are kept and written by ``flush`` after the model call."""

    def __init__(self):
        self._logged: Set[Hashable] = set()
        self._deferred: List[Tuple[int, str]] = []

    def info(self, key: Hashable, message: str, level: int = logging.INFO) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        if tracing():
            self._deferred.append((level, f"{NODE_NAME}: {message}"))
        else:
            logger.log(level, "%s: %s", NODE_NAME, message)

    def warn(self, key: Hashable, message: str) -> None:
        self.info(key, message, logging.WARNING)

    def flush(self) -> None:
        while self._deferred:
            logger.log(*self._deferred.pop(0))
