"""ComfyUI nodes of the pack (filled in by the node issue)."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
