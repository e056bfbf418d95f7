"""prefix_attention: softmax attention over [prefix; sequence] without concatenating them or
repeating the prefix per sample (see op.py; implementations registered by plugin.py)."""
