"""ComfyUI nodes of the pack. Importing this needs no ComfyUI; the V3 nodes are defined only where ComfyUI has them.

The node ids are written out literally (as in the V3 schemas): ComfyUI-Manager and the Comfy Registry find a pack's
nodes by scanning its source for them.
"""
from . import efficient_attention, regional_prompts

NODE_CLASS_MAPPINGS = {"EfficientAttentionPoP": efficient_attention.define_v3_node() or efficient_attention.EfficientAttentionPoP,
                       "RegionalPromptsPoP": regional_prompts.define_v3_node() or regional_prompts.RegionalPromptsPoP}
NODE_DISPLAY_NAME_MAPPINGS = {"EfficientAttentionPoP": "Efficient Attention (PoP)",
                              "RegionalPromptsPoP": "Regional Prompts (PoP)"}
