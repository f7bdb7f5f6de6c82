"""ComfyUI nodes of the pack. Importing this needs no ComfyUI; the V3 node is defined only where ComfyUI has it.

The node id is written out literally (as in efficient_attention.py's V3 schema): ComfyUI-Manager and the Comfy
Registry find a pack's nodes by scanning its source for them.
"""
from .efficient_attention import EfficientAttentionPoP, define_v3_node

_v3_node = define_v3_node()
NODE_CLASS_MAPPINGS = {"EfficientAttentionPoP": _v3_node or EfficientAttentionPoP}
NODE_DISPLAY_NAME_MAPPINGS = {"EfficientAttentionPoP": "Efficient Attention (PoP)"}
