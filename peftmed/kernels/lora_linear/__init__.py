"""lora_linear: y = x W^T + b + s * (dropout(x) A^T) B^T, forward and backward (see op.py)."""
