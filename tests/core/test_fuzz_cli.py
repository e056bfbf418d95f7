"""Fuzzing every command as a careless or hostile user would: every option of every ``peftmed`` command (read
from the parser itself, so a new option is fuzzed without a word here) with plausible and hostile values, and
every file peftmed reads from a folder (run folders, adapter folders, checkpoints, checkpoints to convert,
datasets) damaged, truncated or edited. The CLI is called as the ``peftmed`` entry point calls it
(``peftmed.cli.main``): the only outcomes allowed are a result (exit 0 or 1: "does not fit", "every job failed")
and a PeftmedError printed as a message (exit 2), or argparse's own usage error (exit 2); never another
exception, never a traceback on stderr.

Budgets are kept small whatever the fuzzed values say (the flags appended last win): this searches for crashes,
not for results. ``PEFTMED_FUZZ_CLI_EXAMPLES`` (default 40 per test) raises the search; the count tried is
printed at the end of each test (-s shows it). The draws come from a seeded generator (PEFTMED_FUZZ_SEED, default
0): a failure names its command line or damaged file, and the same seed finds it again.
"""

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from peftmed.cli import build_parser, main

EXAMPLES = int(os.environ.get("PEFTMED_FUZZ_CLI_EXAMPLES", "40"))
SEED = int(os.environ.get("PEFTMED_FUZZ_SEED", "0"))

HOSTILE = ["", " ", "0", "-1", "-0.0", "1e999", "nan", "inf", "-inf", "1e30", "99999999999999999999", "abc",
           "true", "none", "=", "a=b", "k=", "=v", "n_images=-3", "size=huge", "../../etc/passwd", "/proc/x",
           "/dev/null", "x" * 300, "é€😀", "[]", "{}", "*", "|", "lora(r=", "*=lora(r=1e9)", "decoder=prefix(n=0)",
           "T|LoRA|LoRA|X", "cuda:7", "--", "'\"", "a,b,,c", "all", "vision,nope"]

# plausible values by option name: the search reaches past the first check
PLAUSIBLE = {
    "backbone": ["miss-tiny", "miss-tiny", "hf-blip-vqa", "hf-blip-vqa", "toy-vlm", "hf-llava"],
    "recipe": ["*=layernorm", "decoder=lora(r=2)", "fusion=ia3", "F|LoRA|LoRA", "decoder=prefix(n=2)", "*=bitfit"],
    "recipes": ["*=layernorm", "decoder=lora(r=2)"],
    "dataset": ["phantom"] * 6 + ["vqa-rad", "slake", "iu-xray"],
    "task": ["vqa", "report"],
    "split": ["train", "test", "val"], "train_split": ["train", "test"], "eval_split": ["test", "train"],
    "data_options": ["n_images=2", "domain=mr", "domain=xx"], "dataset_option": ["n_images=2", "domain=mr"],
    "backbone_options": ["size=tiny", "image_size=32", "nope=1"], "backbone_option": ["image_size=32"],
    "device": ["cpu", "auto", "cuda", "meta"], "base_dtype": ["bf16", "fp16", "fp32", "auto"],
    "grad_checkpoint": ["all", "decoder", "vision,decoder"], "quantize_components": ["llm", "decoder"],
    "suite": ["default", "mile", "layernorm", "irg", "nope"], "report_to": ["none", "tensorbored"],
    "train_test_overlap": ["drop", "keep"], "kind": ["method", "backbone", "kernel"],
}
INTS, FLOATS = ["1", "2", "3"], ["0.5", "1e-3", "2"]
# how much work any fuzzed command may do: appended last, so these win over fuzzed values of the same flags
GUARDS = {
    "train": ["--steps", "1", "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "2", "--eval-samples",
              "2", "--num-workers", "0", "--progress", "false", "--report-to", "none", "--num-beams", "1", "--device",
              "cpu"],
    "bench": ["--steps", "1", "--eval-samples", "2", "--no-transfer", "--no-peft", "--dataset-option", "n_images=2",
              "--seeds", "0", "--no-isolate", "--no-progress", "--batch-size", "2", "--threads", "1", "--num-beams",
              "1", "--device", "cpu"],
    "eval": ["--max-new-tokens", "2", "--progress", "false", "--num-beams", "1", "--device", "cpu"],
    "predict": ["--num-beams", "1", "--max-new-tokens", "2", "--device", "cpu"],
    "plan": ["--batch-size", "1", "--device", "cpu"],
}
SKIP_OPTIONS = {("kernels", "--build")}  # compiles C++ extensions (tests/ecosystem/test_wheel.py covers it)


def _leaves(parser: argparse.ArgumentParser, prefix: list[str]):
    """(argv prefix, parser) of every command, nested sub-commands (recipe check, plugin new) included."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, [*prefix, name])


COMMANDS = dict((" ".join(p), sp) for p, sp in _leaves(build_parser(), []))


def _value(rnd: random.Random, action, files: dict) -> str:
    """A plausible value most of the time (so the search gets past the first check), a hostile one otherwise."""
    name = action.dest
    plausible = [str(c) for c in action.choices or ()] + PLAUSIBLE.get(name, [])
    if name in files:
        value = files[name]
        plausible += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if action.type is int or getattr(action.type, "__name__", "") == "positive_int":
        plausible += INTS
    elif action.type is float:
        plausible += FLOATS
    if plausible and rnd.random() < 0.8:
        return rnd.choice(plausible)
    return rnd.choice(HOSTILE)


# options a command needs in practice (not required by argparse: they may come from a --config file)
USUALLY = {"train": {"--backbone", "--recipe", "--dataset"}}


def _argv(rnd: random.Random, command: str, parser, files: dict) -> list[str]:
    argv = command.split()
    usually = USUALLY.get(command, set())
    optional = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    chance = min(0.5, 3 / max(1, len(optional)))  # about three options per command line: deep enough, often valid
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings and action.nargs == 0:
            continue
        if not action.option_strings:  # a positional argument
            count = action.nargs if isinstance(action.nargs, int) else 1
            argv += [_value(rnd, action, files) for _ in range(count)]
            continue
        flag = action.option_strings[0]
        if (command, flag) in SKIP_OPTIONS:
            continue
        if not (action.required or rnd.random() < (0.9 if flag in usually else chance)):
            continue
        if action.nargs == 0:
            argv.append(flag)
        elif action.nargs == "?":
            argv += [flag] + ([_value(rnd, action, files)] if rnd.random() < 0.5 else [])
        else:
            count = action.nargs if isinstance(action.nargs, int) else 1 if action.nargs is None else rnd.randint(1, 2)
            argv += [flag] + [_value(rnd, action, files) for _ in range(count)]
    guards = list(GUARDS.get(command.split()[0], []))
    if command == "train" and "phantom" in argv:  # the phantom sets' default sizes would take a while to score
        guards += ["--data-options", "n_images=2"]
    return argv + guards


def _outcome(argv, capsys) -> int:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors (and --help) exit with a message
        code = exc.code if isinstance(exc.code, int) else 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, (argv, err[-3000:])
    assert code in (0, 1, 2), (argv, code, err[-3000:])
    return code


# ---- a trained run, an original checkpoint: what commands read ---------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzfiles")
    run = root / "run"
    assert main(["train", "--backbone", "miss-tiny", "--recipe", "fusion=lora(r=2) decoder=layernorm", "--dataset",
                 "phantom", "--data-options", "n_images=2", "--steps", "1", "--batch-size", "2", "--save-every", "1",
                 "--max-new-tokens", "2", "--progress", "false", "--output", str(run)]) == 0
    from PIL import Image

    Image.new("RGB", (24, 24), "gray").save(root / "scan.png")
    (root / "q.jsonl").write_text(json.dumps({"image": str(root / "scan.png"), "question": "is it normal?"}) + "\n")
    (root / "exp.yaml").write_text("backbone: miss-tiny\nrecipe: '*=layernorm'\ndataset: phantom\nsteps: 1\n")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backbones"))
    from test_convert_llava import _reference, _write_original

    original = _write_original(_reference("llama", "linear"), root / "original", "llama", "linear")
    lora = root / "lora"
    assert main(["train", "--backbone", "hf-blip-vqa", "--recipe", "decoder=lora(r=2)", "--dataset", "phantom",
                 "--data-options", "n_images=2", "--steps", "1", "--batch-size", "2", "--evaluate", "false",
                 "--progress", "false", "--output", str(lora)]) == 0
    assert main(["export", "--to", "peft", str(lora / "adapter"), str(root / "peft")]) == 0
    return {"adapter": [run / "adapter", lora / "adapter"], "image": root / "scan.png", "input": root / "q.jsonl",
            "config": root / "exp.yaml", "src": [original, root / "peft"], "roles": "miss-tiny", "run": run,
            "original": original, "root": root, "compare": root / "nowhere"}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_gives_a_result_or_a_message(command, files, tmp_path_factory, capsys,
                                                                    monkeypatch):
    rnd = random.Random(f"{SEED}:{command}")
    codes = []
    for _ in range(EXAMPLES):
        cwd = tmp_path_factory.mktemp("cwd")  # a fresh folder each time: default outputs land here
        monkeypatch.chdir(cwd)
        codes.append(_outcome(_argv(rnd, command, COMMANDS[command], files), capsys))
        monkeypatch.chdir(files["root"])
        shutil.rmtree(cwd, ignore_errors=True)
    print(f"\n{command}: {len(codes)} command lines tried ({codes.count(0) + codes.count(1)} ran, "
          f"{codes.count(2)} refused with a message)")


# ---- damaged folders: run folders, adapters, checkpoints, checkpoints to convert, datasets -----------------
def _json_value(rnd: random.Random):
    return rnd.choice([None, True, False, 0, -1, 10**12, 1.5, float("nan"), float("inf"), "", "x", "../../etc/passwd",
                       [], [1, "a"], {}, {"a": 1}, "é€"])


def _mutate(rnd: random.Random, node):
    if isinstance(node, dict) and node:
        key = rnd.choice(sorted(node, key=str))
        choice = rnd.randrange(4)
        if choice == 0:
            node[key] = _json_value(rnd)
        elif choice == 1:
            del node[key]
        elif choice == 2:
            node[rnd.choice(["x", "", "seed", "format_version", "tensors"]) + str(rnd.randrange(3))] = _json_value(rnd)
        else:
            node[key] = _mutate(rnd, node[key])
        return node
    if isinstance(node, list) and node:
        i = rnd.randrange(len(node))
        node[i] = _mutate(rnd, node[i]) if rnd.random() < 0.5 else _json_value(rnd)
        return node
    return _json_value(rnd)


def _mutated(rnd: random.Random, data: bytes, is_json: bool) -> bytes | None:
    kind = rnd.choice(["truncate", "bytes", "empty", "delete"] + ["json"] * (4 if is_json else 0))
    if kind == "truncate":
        return data[: rnd.randrange(max(1, len(data)))]
    if kind == "bytes":
        out = bytearray(data)
        for _ in range(rnd.randint(1, 8)):
            if out:
                out[rnd.randrange(len(out))] = rnd.randrange(256)
        return bytes(out)
    if kind == "empty":
        return b""
    if kind == "delete":
        return None
    return json.dumps(_mutate(rnd, json.loads(data)), allow_nan=True).encode()


def _damage(rnd: random.Random, folder: Path) -> str:
    """Damage one file of ``folder`` (JSON files are edited as documents most of the time); returns what was done."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".peftmed-lock" not in p.name)
    target = rnd.choice(files)
    data = target.read_bytes()
    try:
        json.loads(data)
        is_json = True
    except ValueError:
        is_json = False
    new = _mutated(rnd, data, is_json)
    if new is None:
        target.unlink()
    else:
        target.write_bytes(new)
    return f"{target.relative_to(folder)} ({'deleted' if new is None else f'{len(new)} bytes'})"


def _fuzz_folder(name: str, source: Path, tmp_path_factory, capsys, argv_for) -> None:
    rnd = random.Random(f"{SEED}:{name}")
    damaged = []
    for _ in range(EXAMPLES):
        work = tmp_path_factory.mktemp("damaged")
        folder = work / source.name
        shutil.copytree(source, folder)
        what = _damage(rnd, folder)
        damaged.append(what)
        try:
            _outcome([str(a) for a in argv_for(folder, work)], capsys)
        except AssertionError as exc:
            raise AssertionError(f"damaged {what}: {exc}") from None
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{name}: {len(damaged)} damaged folders tried ({len({d.split()[0] for d in damaged})} different files)")


READERS = {
    "eval": lambda f, run: ["eval", "--adapter", run / "adapter", "--progress", "false", "--max-new-tokens", "2",
                            "--num-beams", "1", "--data-options", "n_images=2"],
    "predict": lambda f, run: ["predict", "--adapter", run / "adapter", "--image", f["image"], "--question", "q?",
                               "--num-beams", "1", "--max-new-tokens", "2"],
    "merge": lambda f, run: ["merge", "--adapter", run / "adapter", "--output", run.parent / "merged"],
    "resume": lambda f, run: ["train", "--backbone", "miss-tiny", "--recipe", "fusion=lora(r=2) decoder=layernorm",
                              "--dataset", "phantom", "--data-options", "n_images=2", "--steps", "2", "--batch-size",
                              "2", "--max-new-tokens", "2", "--progress", "false", "--evaluate", "false",
                              "--resume", "--output", run],
    "export": lambda f, run: ["export", "--to", "peft", run / "adapter", run.parent / "exported"],
}


@pytest.mark.slow
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_damaged_run_folder_gives_a_message(reader, files, tmp_path_factory, capsys):
    _fuzz_folder(f"run folder read by {reader}", files["run"], tmp_path_factory, capsys,
                 lambda run, work: READERS[reader](files, run))


@pytest.mark.slow
def test_a_damaged_checkpoint_to_convert_gives_a_message(files, tmp_path_factory, capsys):
    _fuzz_folder("checkpoint to convert", files["original"], tmp_path_factory, capsys,
                 lambda src, work: ["convert", "llava-med", src, work / "out"])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["vqa-rad", "slake"])
def test_a_damaged_dataset_gives_a_message(dataset, tmp_path_factory, capsys):
    from PIL import Image

    base = tmp_path_factory.mktemp(dataset) / "data"
    (base / "images").mkdir(parents=True)
    (base / "imgs" / "x").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (24, 24), (i * 40, 0, 0)).save(base / "images" / f"s{i}.jpg")
        Image.new("RGB", (24, 24), (0, i * 40, 0)).save(base / "imgs" / "x" / f"s{i}.jpg")
    vqa = [{"qid": i, "image_name": f"s{i % 3}.jpg", "question": f"is it {i}?", "answer": "yes" if i % 2 else "no",
            "answer_type": "CLOSED"} for i in range(6)]
    (base / "trainset.json").write_text(json.dumps(vqa[:4]))
    (base / "testset.json").write_text(json.dumps(vqa[4:]))
    slake = [{"qid": i, "img_name": f"x/s{i % 3}.jpg", "question": f"is it {i}?", "answer": "yes",
              "answer_type": "CLOSED", "q_lang": "en"} for i in range(6)]
    for split, rows in (("train", slake[:4]), ("validate", slake[4:5]), ("test", slake[5:])):
        (base / f"{split}.json").write_text(json.dumps(rows))
    _fuzz_folder(f"{dataset} dataset", base, tmp_path_factory, capsys,
                 lambda folder, work: ["train", "--backbone", "miss-tiny", "--recipe", "*=layernorm", "--dataset",
                                       dataset, "--data-dir", folder, "--steps", "1", "--batch-size", "2",
                                       "--max-new-tokens", "2", "--progress", "false", "--output", work / "run"])
