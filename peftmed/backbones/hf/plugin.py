"""The built-in plugin registering the transformers-based backbones (``hf-*`` and the real architectures by
name: ``blip-vqa-base``, ``llava-med-7b``, ``llava-v1-7b``)."""

from __future__ import annotations

from ...hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    # imported here so that loading the plugin list does not import transformers' model code
    from . import blip, encoder, llava, vlm

    for backbone in (blip.BACKBONE, *blip.PRESET_BACKBONES, llava.BACKBONE, *llava.PRESET_BACKBONES):
        register(backbone)
    for backbone in (*vlm.BACKBONES, *vlm.PRESET_BACKBONES):
        register(backbone)
    for backbone in encoder.BACKBONES:
        register(backbone)
