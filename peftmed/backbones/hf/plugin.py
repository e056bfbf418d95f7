"""The built-in plugin registering the transformers-based backbones (``hf-*``)."""

from __future__ import annotations

from ...hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    # imported here so that loading the plugin list does not import transformers' model code
    from . import blip, encoder, llava

    register(blip.BACKBONE)
    register(llava.BACKBONE)
    for backbone in encoder.BACKBONES:
        register(backbone)
