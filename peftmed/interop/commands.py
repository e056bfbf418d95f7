"""``peftmed export --to peft`` and ``peftmed import --from peft``."""

from __future__ import annotations

from ..cli import Command
from ..hookspecs import hookimpl


def _export_configure(p):
    p.add_argument("--to", required=True, choices=["peft"], help="target format")
    p.add_argument("adapter", help="peftmed adapter folder (adapter.json + adapter.safetensors)")
    p.add_argument("out", help="folder to write (adapter_config.json + adapter_model.safetensors)")


def _export_run(args) -> int:
    from .peft_format import export_to_peft

    print(f"wrote {export_to_peft(args.adapter, args.out)} (peft format)")
    return 0


def _import_configure(p):
    p.add_argument("--from", dest="source", required=True, choices=["peft"], help="source format")
    p.add_argument("src", help="peft adapter folder")
    p.add_argument("out", help="peftmed adapter folder to write")
    p.add_argument("--backbone", "-b", required=True, help="the peftmed backbone of the model (e.g. hf-blip-vqa)")


def _import_run(args) -> int:
    from .peft_format import import_from_peft

    print(f"wrote {import_from_peft(args.src, args.out, backbone=args.backbone)} (peftmed adapter)")
    return 0


@hookimpl
def register_commands(register):
    register(Command("export", "write an adapter in another library's format ('--to peft')", _export_configure, _export_run))
    register(Command("import", "read an adapter written by another library ('--from peft')", _import_configure, _import_run))
