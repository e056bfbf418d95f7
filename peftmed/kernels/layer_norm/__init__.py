"""layer_norm over the last dimension with a fused backward (see op.py)."""
