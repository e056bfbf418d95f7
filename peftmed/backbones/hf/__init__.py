"""Backbones built on transformers models: ``hf-blip-vqa``, ``hf-llava``, ``hf-encoder``.

Each wraps the transformers model in a small module (the HF model at ``.model``) that speaks
peftmed's VQA task protocol and names its components and roles; nothing is downloaded: fresh
models come from tiny presets or a config, real ones from a local folder (``from_pretrained``).
"""
