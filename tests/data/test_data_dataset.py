"""VQADataset (decode once, memory and disk cache), collate, load_records and majority_baseline."""

import numpy as np
import pytest
import torch
from PIL import Image

from peftmed.data import DatasetSpec, VQADataset, VQARecord, collate, load_records, majority_baseline
from peftmed.data.records import DataError
from peftmed.errors import ConfigError, UnknownNameError
from peftmed.plugins import build_registry


class CountingImage:
    """A zero-argument image source that counts how often it is decoded."""

    def __init__(self, color, size=(40, 24), mode="RGB"):
        self.color, self.size, self.mode, self.calls = color, size, mode, 0

    def __call__(self):
        self.calls += 1
        return Image.new(self.mode, self.size, self.color)


def _rec(qid, image, image_id, answer="yes", answer_type="CLOSED", **kw):
    return VQARecord(qid=qid, question=f"q{qid}?", answer=answer, answer_type=answer_type, image=image,
                     image_id=image_id, **kw)


def test_items_are_resized_rgb_uint8_and_each_image_decoded_once():
    red, grey = CountingImage((255, 0, 0)), CountingImage(128, mode="L")
    recs = [_rec("a", red, "red.png"), _rec("b", red, "red.png"), _rec("c", grey, "grey.png", organ="HEAD")]
    ds = VQADataset(recs, image_size=8)
    items = [ds[i] for i in range(3)] + [ds[0]]
    assert red.calls == 1 and grey.calls == 1
    img = items[0]["image"]
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 8)
    assert img[0].min() == 255 and img[1].max() == 0
    assert items[2]["image"].shape == (3, 8, 8) and items[2]["organ"] == "HEAD"
    assert (items[2]["qid"], items[2]["question"], items[2]["answer"]) == ("c", "qc?", "yes")


def test_bicubic_resize_matches_pil():
    arr = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    ds = VQADataset([_rec("a", lambda: Image.fromarray(arr), "noise")], image_size=12)
    expected = np.asarray(Image.fromarray(arr).resize((12, 12), Image.BICUBIC))
    assert np.array_equal(ds[0]["image"].permute(1, 2, 0).numpy(), expected)


def test_disk_cache_is_reused_by_a_new_dataset_and_keyed_by_size(tmp_path):
    src = CountingImage((10, 20, 30))
    recs = [_rec("a", src, "scan/1.png")]
    first = VQADataset(recs, image_size=8, cache_dir=tmp_path)[0]["image"]
    again = VQADataset(recs, image_size=8, cache_dir=tmp_path)[0]["image"]
    assert src.calls == 1 and torch.equal(first, again)
    assert VQADataset(recs, image_size=4, cache_dir=tmp_path)[0]["image"].shape == (3, 4, 4)
    assert src.calls == 2  # another size is another cache entry
    for f in tmp_path.glob("*.npy"):  # a truncated cache file (killed writer) is decoded again
        f.write_bytes(f.read_bytes()[:20])
    assert torch.equal(VQADataset(recs, image_size=8, cache_dir=tmp_path)[0]["image"], first)


def test_without_cache_images_are_decoded_each_time():
    src = CountingImage((1, 2, 3))
    ds = VQADataset([_rec("a", src, "x")], image_size=4, cache=False)
    ds[0], ds[0]
    assert src.calls == 2


def test_collate_shapes_and_lists():
    recs = [_rec(str(i), CountingImage((i, i, i)), f"i{i}", answer_type=t, question_type="PRES")
            for i, t in enumerate(["CLOSED", "OPEN", "CLOSED"])]
    ds = VQADataset(recs, image_size=6)
    batch = collate([ds[2], ds[0], ds[1]])
    assert batch["images"].shape == (3, 3, 6, 6) and batch["images"].dtype == torch.uint8
    assert batch["qids"] == ["2", "0", "1"] and batch["answer_types"] == ["CLOSED", "CLOSED", "OPEN"]
    assert set(batch) == {"images", "questions", "answers", "qids", "answer_types", "question_types", "organs"}
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert [b["images"].shape[0] for b in loader] == [2, 1]


def test_bad_inputs_name_the_value(tmp_path):
    with pytest.raises(ConfigError, match="0"):
        VQADataset([], image_size=0)
    with pytest.raises(DataError, match="'MAYBE'"):
        _rec("a", "x.png", "x", answer_type="MAYBE")
    with pytest.raises(DataError, match="duplicate qid.*'a'"):
        VQADataset([_rec("a", "x.png", "x"), _rec("a", "y.png", "y")], image_size=4)
    missing = tmp_path / "absent.png"
    with pytest.raises(FileNotFoundError, match="'q7'.*absent.png"):
        VQADataset([_rec("q7", str(missing), "absent.png")], image_size=4)[0]


def test_load_records_unknown_dataset_lists_the_registered_ones():
    reg = build_registry(load_entrypoints=False)
    with pytest.raises(UnknownNameError) as err:
        load_records("vqa-rda", "train", registry=reg)
    msg = str(err.value)
    assert "'vqa-rda'" in msg and "vqa-rad" in msg and "phantom" in msg and "slake" in msg
    with pytest.raises(UnknownNameError, match="'dev'"):
        load_records("phantom", "dev", registry=reg)


def test_a_third_party_dataset_plugin_is_loadable_by_name():
    class Plugin:
        from peftmed.hookspecs import hookimpl

        @hookimpl
        def register_datasets(self, register):
            register(DatasetSpec(name="two-questions", description="test", load=lambda split, data_dir=None: [
                _rec("1", "a.png", "a"), _rec("2", "a.png", "a")] if split == "train" else []))

    reg = build_registry(load_entrypoints=False, extra_plugins=[Plugin()])
    assert [r.qid for r in load_records("two-questions", "train", registry=reg)] == ["1", "2"]
    with pytest.raises(DataError, match="'test' of dataset 'two-questions' is empty"):
        load_records("two-questions", "test", registry=reg)


def test_majority_baseline_per_answer_type():
    train = [_rec("1", "a", "a", "Yes"), _rec("2", "a", "a", "no"), _rec("3", "a", "a", "yes."),
             _rec("4", "a", "a", "Liver", "OPEN"), _rec("5", "a", "a", "lung", "OPEN"), _rec("6", "a", "a", "liver", "OPEN")]
    test = [_rec("t1", "b", "b", "no"), _rec("t2", "b", "b", "lung", "OPEN")]
    assert majority_baseline(train, test) == {"t1": "yes", "t2": "liver"}
    # a type absent from training falls back to the overall most frequent answer
    assert majority_baseline(train[:3], test) == {"t1": "yes", "t2": "yes"}


from peftmed.testing import dataset_conformance_tests  # noqa: E402

# the shared conformance kit every third-party dataset plugin runs, on the generated built-in
TestPhantomConformance = dataset_conformance_tests("phantom", options={"n_images": 5})
