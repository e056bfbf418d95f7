"""Every method on every tiny vision-language family: does it apply, do 20 training steps lower the loss, does the
saved adapter load to the same logits, does the exported peft adapter give the same logits in peft, does the merged
model saved as a plain transformers folder give the same logits; then the real-size presets' parameter counts.

    python benchmarks/family_matrix.py [--only qwen2-vl gemma3 ...] [--methods lora ia3 ...] [--steps 20]

Each cell is measured, not assumed: "applies" is peftmed.apply on the family's tiny random model (a refusal prints
its reason); "loss" is the first and last of ``--steps`` AdamW steps on one batch of 4; "save/load" compares the
logits of the trained model and of a fresh model with the adapter loaded (torch.equal); "peft" loads the export
with peft's ``PeftModel.from_pretrained`` on the same transformers model (max |difference| <= 1e-5); "merge"
saves ``merge_and_unload()``'s transformers model with ``save_pretrained``, loads it with the family's
``from_pretrained`` and compares (<= 1e-5). "-": the method has no such form (peft holds LoRA, IA3, the DoRA plugin and
LayerNorm-tuning; merging needs a method whose effect is a weight change). Exit status 1 when a cell fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# method -> recipe on the tiny families (vision tower, connector, language model where the method applies there)
METHODS = {
    "lora": "vision=lora(r=4) projector=lora(r=4,roles=mlp.up+mlp.down) llm=lora(r=4)",
    "dora": "vision=dora(r=4) llm=dora(r=4)",
    "vera": "vision=vera(r=8) llm=vera(r=8)",
    "ia3": "vision=ia3 llm=ia3",
    "layernorm": "vision=layernorm projector=layernorm llm=layernorm",
    "ffn": "vision=ffn llm=ffn",
    "attention": "vision=attention llm=attention",
    "bitfit": "vision=bitfit projector=bitfit llm=bitfit",
    "full": "projector=full",
    "prefix": "llm=prefix(n=4)",
    "ptuning-v2": "llm=ptuning-v2(n=4)",
}
TOL = 1e-5


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)["logits"]


def _fit(recipe: str, bb, registry) -> str:
    """Drop the parts of a recipe whose component has nothing the method takes (Gemma 3's connector is a norm and
    a bare weight: no linear layer for LoRA, no bias for BitFit), said in the row."""
    from peftmed.errors import NoMatchError
    from peftmed.model import apply

    kept = []
    for part in recipe.split():
        try:
            apply(bb.build(), part, registry=registry)
            kept.append(part)
        except NoMatchError:
            continue
    return " ".join(kept)


def cell_row(family: str, method: str, recipe: str, steps: int, registry, work: Path) -> dict:
    import peftmed
    from peftmed.backbones.hf import vlm
    from peftmed.backbones.hf.families import FAMILIES
    from peftmed.errors import PeftmedError
    from peftmed.interop import export_to_peft

    row = {"family": family, "method": method}
    bb = registry.backbone(family)
    torch.manual_seed(0)
    model = bb.build()
    fitted = _fit(recipe, bb, registry)
    row["recipe"] = fitted
    try:
        if not fitted:
            raise PeftmedError(f"no component of {family} has what {method} takes")
        pm = peftmed.apply(model, fitted, registry=registry)
    except PeftmedError as exc:
        row["applies"] = f"refused: {exc}"
        return row
    row["applies"] = "yes"
    (batch,) = pm.base_model.example_inputs(4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = pm.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    row["loss"] = (losses[0], losses[-1])
    row["loss_ok"] = losses[-1] < losses[0]
    pm.eval()
    ours = _logits(pm, batch)
    pm.save_adapter(work / "a")
    back = peftmed.load_adapter(bb.build(), work / "a", registry=registry).eval()
    row["save_load"] = bool(torch.equal(_logits(back, batch), ours))

    form = registry.method(method).peft
    if form is not None and form.adapter:
        import peft

        export_to_peft(work / "a", work / "peft", registry=registry)
        wrapper = bb.build()
        peft.PeftModel.from_pretrained(wrapper.model, str(work / "peft"))
        wrapper.eval()
        row["peft"] = float((_logits(wrapper, batch) - ours).abs().max())
    try:
        merged = pm.merge_and_unload()
    except PeftmedError:
        pass  # not a weight change (prefixes, P-Tuning v2): served as adapters only
    else:
        merged.model.save_pretrained(str(work / "merged"))
        plain = vlm.model_class(FAMILIES[family]["model_type"]).from_pretrained(str(work / "merged"))
        fresh = bb.build()
        fresh.model = plain.eval()
        row["merge"] = float((_logits(fresh, batch) - ours).abs().max())
    return row


def _mark(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "exact" if value else "DIFFERS"
    return f"{value:.1e}" + ("" if value <= TOL else " FAIL")


def main(argv=None) -> int:
    import peftmed
    from peftmed.backbones.hf import vlm
    from peftmed.backbones.hf.families import FAMILIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="families (default: every one whose processor's packages are here)")
    p.add_argument("--methods", nargs="*", choices=sorted(METHODS), help="methods (default: all)")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    registry = peftmed.build_registry()
    families = args.only or sorted(FAMILIES)
    skipped = [f for f in families if not all(importlib.util.find_spec(r) for r in FAMILIES[f].get("requires", ()))]
    families = [f for f in families if f not in skipped]
    methods = args.methods or list(METHODS)
    print(f"torch {torch.__version__}; {args.steps} AdamW steps (lr 1e-2) on one batch of 4; tolerance {TOL}")
    head = f"{'family':<13} {'method':<11} {'applies':<8} {'loss first -> last':<20} {'save/load':<9} {'peft':<10} {'merge':<10}"
    print(head + "\n" + "-" * len(head))
    failed = 0
    t0 = time.perf_counter()
    for family in families:
        for method in methods:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    row = cell_row(family, method, METHODS[method], args.steps, registry, Path(tmp))
                except Exception as exc:  # a defect: the row says so and the run goes on
                    row = {"family": family, "method": method, "applies": f"ERROR {type(exc).__name__}: {exc}"}
            if row["applies"] != "yes":
                print(f"{family:<13} {method:<11} {row['applies']}")
                failed += row["applies"].startswith("ERROR")
                continue
            loss = f"{row['loss'][0]:.3f} -> {row['loss'][1]:.3f}" + ("" if row["loss_ok"] else " !")
            bad = (not row["loss_ok"] or not row["save_load"]
                   or any(row.get(k) is not None and row[k] > TOL for k in ("peft", "merge")))
            failed += bad
            print(f"{family:<13} {method:<11} {'yes':<8} {loss:<20} {_mark(row['save_load']):<9} "
                  f"{_mark(row.get('peft')):<10} {_mark(row.get('merge')):<10}"
                  + ("" if row["recipe"] == METHODS[method] else f"  ({row['recipe']})"))
    print(f"{failed} failing rows; {time.perf_counter() - t0:.0f} s"
          + (f"; not run (a package their processor needs is missing): {', '.join(skipped)}" if skipped else ""))
    print("\nreal-size presets (meta device):")
    for family, fam in sorted(FAMILIES.items()):
        for preset, spec in fam["presets"].items():
            n = vlm.parameter_count(family, preset)
            said = spec.get("params")
            print(f"  {preset:<15} {n:>14,} parameters"
                  + ("" if said in (None, n) else f"  (the family's data says {said:,})"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
