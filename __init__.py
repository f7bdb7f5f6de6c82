"""Efficient Attention (PoP): a ComfyUI node pack, and the attention library behind it.

ComfyUI imports this folder (under any folder name) and reads NODE_CLASS_MAPPINGS. Outside ComfyUI
the same folder is the Python package ``efficient_attention_pop``; nothing here needs ComfyUI.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
