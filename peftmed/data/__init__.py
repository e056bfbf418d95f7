"""Med-VQA data: records, registered datasets (vqa-rad, slake, phantom), a caching torch Dataset.

    from peftmed.data import load_records, VQADataset, collate
    train = load_records("phantom", "train", n_images=200, seed=0)
    test = load_records("vqa-rad", "test", data_dir="path/to/vqa_rad")
    loader = torch.utils.data.DataLoader(VQADataset(train, image_size=64), batch_size=16,
                                         shuffle=True, collate_fn=collate)

Datasets are plugins (``register_datasets`` hook); ``peftmed.data.plugin`` registers the built-ins.
Instruction-format rendering with a test-leak guard is in ``peftmed.data.instruction``.
"""

from .dataset import VQADataset, collate, image_to_tensor
from .records import (
    ANSWER_TYPES,
    DatasetSpec,
    DataError,
    MissingDataError,
    VQARecord,
    check_unique_qids,
    load_records,
    majority_baseline,
    normalize_answer,
)

__all__ = [
    "ANSWER_TYPES", "DataError", "DatasetSpec", "MissingDataError", "VQADataset", "VQARecord",
    "check_unique_qids", "collate", "image_to_tensor", "load_records", "majority_baseline",
    "normalize_answer",
]
