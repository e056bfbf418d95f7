"""``peftmed predict`` and ``peftmed merge``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import Command, positive_int
from ..data.images import open_image
from ..errors import ConfigError
from ..files import check_output_path, write_text_atomic
from ..hookspecs import hookimpl
from ..plugins import default_registry
from ..run.model import load_adapted
from .merge import merge_adapter
from .predict import answer, question_limit, run_task


# ---- peftmed predict ---------------------------------------------------------------------------------
def _predict_configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Ask a fine-tuned model about your own images. The base model, tokenizer and image preparation come\n"
        "from the adapter's training run (its train_config.json and tokenizer/), as 'peftmed eval' rebuilds them.\n\n"
        "examples:\n"
        "  peftmed predict --adapter runs/rad-lora/adapter --image scan.png --question 'Is there a fracture?'\n"
        "  peftmed predict --adapter runs/rad-lora/adapter --input questions.jsonl --output answers.jsonl\n"
        "  peftmed predict --adapter runs/iu-report/adapter --task report --image chest.png\n\n"
        "--input: one JSON object per line with \"image\" (a path, relative to the file's folder) and \"question\"\n"
        "(not needed for --task report); any \"id\" is copied to the output line.")
    p.add_argument("--adapter", required=True, help="adapter folder (a run's adapter/ or a checkpoint's adapter/)")
    p.add_argument("--image", help="an image file (PNG, JPEG...)")
    p.add_argument("--question", help="the question about --image")
    p.add_argument("--input", help="a JSONL file of {\"image\": ..., \"question\": ...} lines")
    p.add_argument("--output", help="write the answers as JSONL here (default: print them); an existing file is "
                                    "refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--task", help="vqa or report [default: the adapter's run's task]")
    p.add_argument("--batch-size", type=positive_int, default=16, help="questions per batch [default: 16]")
    p.add_argument("--num-beams", type=positive_int, default=3, help="beams of answer generation [default: 3, as eval]")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="longest answer in tokens [default: the run's, derived from its training answers]")
    p.add_argument("--device", default="auto", help="cpu, cuda... [default: auto]")
    p.add_argument("--base-dtype", choices=["auto", "fp32", "bf16", "fp16"], help="[default: the run's]")
    p.add_argument("--quantize", choices=["none", "nf4"], help="[default: the run's]")


def _read_inputs(path: Path, needs_question: bool) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"--input {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--input {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as "
                          f"UTF-8 (JSON Lines are UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"--input {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except RecursionError:
            raise ConfigError(f"{path}:{n}: the JSON is nested too deeply; expected a flat object "
                              f"{{\"image\": ..., \"question\": ...}}") from None
        except ValueError as exc:
            raise ConfigError(f"{path}:{n}: not a JSON object ({exc})") from None
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise ConfigError(f"{path}:{n}: expected {{\"image\": \"path\", \"question\": \"...\"}}, got {line[:80]!r}")
        if needs_question and not (isinstance(item.get("question"), str) and item["question"].strip()):
            raise ConfigError(f"{path}:{n}: no \"question\" (a non-empty string)")
        image = Path(item["image"])
        item["_path"] = image if image.is_absolute() else path.parent / image
        items.append(item)
    if not items:
        raise ConfigError(f"--input {str(path)!r} holds no lines")
    return items


def _predict_run(args) -> int:
    if bool(args.image) == bool(args.input):
        raise ConfigError("pass either --image (with --question) or --input FILE.jsonl")
    if args.output:
        out = check_output_path(args.output, flag="--output", kind="file")
        if args.input and out.resolve() == Path(args.input).resolve():
            raise ConfigError(f"--output {args.output!r} is the --input file; answers would replace the questions. "
                              f"Choose another --output")
        if out.exists() and not args.overwrite:
            raise ConfigError(f"--output {args.output!r} exists; pass --overwrite to replace it, or choose another "
                              f"--output")
    task_name = args.task
    needs_question = default_registry().get("task", task_name or run_task(args.adapter) or "vqa").needs_question
    if args.image:
        if args.question is None and needs_question:
            raise ConfigError("--image needs --question (or --task report for a report)")
        items = [{"image": args.image, "question": args.question or "", "_path": Path(args.image)}]
    else:
        items = _read_inputs(Path(args.input), needs_question)
    for i, item in enumerate(items):  # every image readable before a model is built
        item["_pil"] = open_image(item["_path"], what=f"image {item['image']!r}" if len(items) == 1 else
                                  f"line {i + 1} ({item['image']!r})")
    task, model, opts, manifest = load_adapted(args.adapter, device=args.device, base_dtype=args.base_dtype,
                                            quantize=args.quantize, task=task_name)
    if task.needs_question and any(not str(it.get("question") or "").strip() for it in items):
        raise ConfigError(f"the adapter answers questions (task {task.name}): every image needs a \"question\"")
    answers, truncated = answer(task, model, [it["_pil"] for it in items], [it.get("question") or "" for it in items],
                                batch_size=args.batch_size, num_beams=args.num_beams,
                                max_new_tokens=args.max_new_tokens or opts.get("max_new_tokens"))
    if truncated:
        limit = question_limit(model)
        print(f"note: {truncated} question(s) were longer than the model's limit"
              f"{f' of {limit} tokens' if limit else ''}; they were cut to it and answered as cut", file=sys.stderr)
    rows = []
    for item, text in zip(items, answers):
        row = {k: v for k, v in item.items() if not k.startswith("_")}
        row[task.output] = text
        rows.append(row)
    if args.output:
        write_text_atomic(args.output, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} {task.output}(s) written to {args.output}")
    elif len(rows) == 1:
        print(answers[0])
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


# ---- peftmed merge -----------------------------------------------------------------------------------
def _merge_configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fold an adapter into its base weights and write a model folder that loads without peftmed\n"
        "(transformers backbones: from_pretrained; MISS: config.json + model.safetensors in BLIP key format).\n"
        "Prefix and P-Tuning v2 cannot merge: they are refused by name unless --keep-unmergeable writes them\n"
        "as a peftmed adapter in OUTPUT/adapter.\n\n"
        "example:\n"
        "  peftmed merge --adapter runs/rad-lora/adapter --output models/blip-rad-merged\n"
        "  python -c \"from transformers import BlipForQuestionAnswering as B; B.from_pretrained('models/blip-rad-merged')\"")
    p.add_argument("--adapter", required=True, help="adapter folder (a run's adapter/)")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--keep-unmergeable", action="store_true",
                   help="write methods that cannot merge (prefix, P-Tuning v2) as an adapter in OUTPUT/adapter")
    p.add_argument("--base-dtype", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the written weights [default: the run's]")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")


def _merge_run(args) -> int:
    result = merge_adapter(args.adapter, args.output, keep_unmergeable=args.keep_unmergeable,
                           base_dtype=args.base_dtype, overwrite=args.overwrite)
    print(f"merged {result['recipe']} into {result['backbone']}: {result['output']} ({', '.join(result['files'])})")
    if "adapter" in result:
        kept = " ".join(f"{c}={'+'.join(m)}" for c, m in result["kept"].items())
        print(f"kept as an adapter (not mergeable): {kept} -> {result['adapter']} (load it with peftmed.load_adapter)")
    return 0


@hookimpl
def register_commands(register):
    register(Command("predict", "ask a fine-tuned model about an image ('--image F --question Q' or '--input F.jsonl')",
                     _predict_configure, _predict_run))
    register(Command("merge", "fold an adapter into the base weights; write a model that loads without peftmed",
                     _merge_configure, _merge_run))
