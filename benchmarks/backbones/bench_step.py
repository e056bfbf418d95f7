"""Training-step cost of MISS: forward + backward time and peak memory of ``miss-tiny`` and ``miss-base``
next to transformers' ``BlipForQuestionAnswering`` of the same size (random init), on CPU.

    python benchmarks/backbones/bench_step.py                 # tiny b1/b8, base b1/b8
    python benchmarks/backbones/bench_step.py --sizes tiny    # quick
    python benchmarks/backbones/bench_step.py --csv out.csv

Both models get the same question/answer token ids (the MISS tokenizer's), the same image size,
dropout 0.1 and label smoothing 0.1, full fine-tuning (every parameter trainable). Each
(model, size, batch) runs in a fresh process, so its peak memory (resident-set growth from before the
model is built: weights + gradients + activations, see peftmed.bench.memory) is its own; time is
the median (p20-p80) over repetitions after warm-up. miss-base is slow on a 2-core CPU: it runs few
repetitions, stated in the table. On a shared machine, compare the two rows of a pair, not runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

REPS = {("tiny", 1): (3, 30), ("tiny", 8): (3, 30), ("base", 1): (1, 3), ("base", 8): (1, 2)}  # (warm-up, timed)


def _blip_config(cfg, tok):
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(hidden_size=cfg.vision_width, intermediate_size=int(cfg.vision_width * cfg.vision_mlp_ratio),
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                           image_size=cfg.image_size, patch_size=cfg.patch_size),
        text_config=dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         max_position_embeddings=cfg.max_position_embeddings, encoder_hidden_size=cfg.vision_width,
                         hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
                         label_smoothing=cfg.label_smoothing, bos_token_id=tok.dec_id, pad_token_id=tok.pad_id,
                         sep_token_id=tok.sep_id),
    )


def measure(impl: str, size: str, batch_size: int, threads: int = 0) -> dict:
    """One (model, size, batch) in this process: build, warm up, time steps, report peak memory."""
    import torch
    from transformers import BlipForQuestionAnswering

    import peftmed
    from peftmed.backbones.images import prepare_images
    from peftmed.bench.memory import MemoryProbe

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    # sizes, tokenizer and batch come from a weightless (meta) build, before memory is counted
    shape = peftmed.build_backbone(f"miss-{size}", device="meta")
    tok, cfg = shape.tokenizer, shape.config
    batch = shape.example_batch(batch_size)
    q_ids, q_mask, _ = tok.encode(batch["questions"], cfg.max_question_tokens, first=tok.enc_id)
    a_ids, a_mask, _ = tok.encode(batch["answers"], cfg.max_answer_tokens, first=tok.dec_id)
    probe = MemoryProbe(torch.device("cpu"))
    probe.start()
    if impl == "peftmed":
        model = peftmed.build_backbone(f"miss-{size}", tokenizer=tok)
        step_loss = lambda: model.compute_loss(batch)
    else:
        model = BlipForQuestionAnswering(_blip_config(cfg, tok))
        labels = a_ids.masked_fill(~a_mask, -100)
        pixels = prepare_images(batch["images"], cfg.image_size, cfg.image_mean, cfg.image_std)
        step_loss = lambda: model(input_ids=q_ids, attention_mask=q_mask.long(), pixel_values=pixels,
                                  decoder_input_ids=a_ids, decoder_attention_mask=a_mask.long(), labels=labels).loss
    model.train()
    params = sum(p.numel() for p in model.parameters())
    warmup, reps = REPS[(size, batch_size)]
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        loss = step_loss()
        loss.backward()
        elapsed = (time.perf_counter() - t0) * 1e3
        model.zero_grad(set_to_none=False)  # keep gradient buffers: a training loop holds them too
        if i >= warmup:
            times.append(elapsed)
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"model": impl, "size": size, "batch": batch_size, "params": params, "reps": reps,
            "p20_ms": qs[1], "p50_ms": statistics.median(times), "p80_ms": qs[7],
            "peak_mib": probe.peak_mib(), "memory_method": probe.method, "threads": torch.get_num_threads()}


def run_isolated(impl: str, size: str, batch: int, threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, __file__, "--one", impl, size, str(batch), "--threads", str(threads)], capture_output=True,
                         text=True, env=env, check=False)
    if out.returncode != 0:  # e.g. out of memory: report the row, keep measuring the others
        print(f"# {impl} {size} b{batch} failed (exit {out.returncode}): {out.stderr.strip()[-500:]}", file=sys.stderr)
        return {"model": impl, "size": size, "batch": batch, "failed": f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 1], choices=[1, 8])
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0 = torch's default; 1 is steadier on a busy shared machine)")
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, size, batch = args.one
        print(json.dumps(measure(impl, size, int(batch), args.threads)))
        return
    rows = []
    header = (f"{'model':<26} {'batch':>5} {'params':>12} {'reps':>4} {'step p50 ms':>12} {'p20-p80 ms':>17} "
              f"{'peak MiB':>9} {'vs HF time':>10} {'vs HF mem':>9}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for batch in args.batches:
            ours, hf = (run_isolated("peftmed", size, batch, args.threads),
                         run_isolated("transformers", size, batch, args.threads))
            rows += [ours, hf]
            for r in (ours, hf):
                name = f"miss-{size} (peftmed)" if r is ours else "BlipForQuestionAnswering"
                if "failed" in r:
                    print(f"{name:<26} {batch:>5} failed ({r['failed']})", flush=True)
                    continue
                pair = "failed" not in ours and "failed" not in hf
                ratio_t = (f"{ours['p50_ms'] / hf['p50_ms']:.2f}x" if r is ours else "1.00x") if pair else "n/a"
                ratio_m = (f"{ours['peak_mib'] / hf['peak_mib']:.2f}x" if r is ours else "1.00x") if pair else "n/a"
                print(f"{name:<26} {r['batch']:>5} {r['params']:>12,} {r['reps']:>4} {r['p50_ms']:>12.1f} "
                      f"{r['p20_ms']:>8.1f}-{r['p80_ms']:<8.1f} {r['peak_mib']:>9.0f} {ratio_t:>10} {ratio_m:>9}",
                      flush=True)
    done = [r for r in rows if "failed" not in r]
    if not done:
        raise SystemExit("every run failed")
    print(f"\nCPU, {done[0]['threads']} torch threads, forward+backward of the answer loss, full fine-tuning; "
          f"peak = {done[0]['memory_method']}. miss-base: few repetitions (slow on 2 cores).")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(done[0]) + ["failed"])
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
