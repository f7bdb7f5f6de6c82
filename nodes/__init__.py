"""ComfyUI nodes of the pack. Importing this needs no ComfyUI; the V3 node is defined only where ComfyUI has it."""
from .efficient_attention import DISPLAY_NAME, NODE_ID, EfficientAttentionPoP, define_v3_node

_v3_node = define_v3_node()
NODE_CLASS_MAPPINGS = {NODE_ID: _v3_node or EfficientAttentionPoP}
NODE_DISPLAY_NAME_MAPPINGS = {NODE_ID: DISPLAY_NAME}
