"""A run: the options it was trained with, the folder it writes, and its model rebuilt from that folder.

One home for what ``train`` writes and ``eval``, ``predict``, ``merge`` and the bench read back:

- :mod:`peftmed.run.config`: the options (``RUN_OPTIONS``, :class:`TrainConfig`), experiment files, and the
  check of options read back from a folder;
- :mod:`peftmed.run.folder`: the folder's layout, ``train_config.json`` read and checked, the output check,
  the lock a training process holds;
- :mod:`peftmed.run.model`: the run's base model and tokenizer built as training built them, and an
  adapter of the run loaded onto it (``load_adapted``).
"""

from .config import BASE_MODEL_OPTIONS, DICT_OPTIONS, RUN_OPTIONS, TrainConfig
from .folder import RUN_CONFIG, TOKENIZER_DIR, RunLock, check_output, find_run, read_run_config
from .model import build_model, load_adapted, save_tokenizer

__all__ = ["BASE_MODEL_OPTIONS", "DICT_OPTIONS", "RUN_CONFIG", "RUN_OPTIONS", "TOKENIZER_DIR", "RunLock", "TrainConfig",
           "build_model", "check_output", "find_run", "load_adapted", "read_run_config", "save_tokenizer"]
