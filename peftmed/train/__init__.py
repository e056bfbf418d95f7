"""Training and evaluation: a resumable trainer (DDP/FSDP under torchrun), evaluation by qid, the CLI.

    from peftmed.train import Trainer, TrainConfig, evaluate
    from peftmed.data import VQADataset, load_records

    train = load_records("phantom", "train")
    test = load_records("phantom", "test")
    pm = peftmed.apply(peftmed.build_backbone("miss-tiny", texts=...), "*=lora(r=8)", keep_base=False)
    result = Trainer(pm, VQADataset(train, pm.image_size), TrainConfig(steps=200, lr=1e-3),
                     output_dir="runs/lora").train()
    print(evaluate(pm, test).summary())

``peftmed train`` and ``peftmed eval`` (``peftmed.train.commands``) wrap the same pieces.
"""

from .checkpoint import CheckpointError, find_checkpoint, latest_checkpoint
from ..run.config import TrainConfig
from .evaluate import EvalResult, baseline_scores, evaluate
from .trainer import (NonFiniteLossError, Trainer, TrainingInterrupted, TrainResult, seed_everything,
                      trainable_parameters)

__all__ = [
    "CheckpointError", "EvalResult", "NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "TrainingInterrupted",
    "baseline_scores", "evaluate", "find_checkpoint", "latest_checkpoint", "seed_everything",
    "trainable_parameters",
]
