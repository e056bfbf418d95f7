"""Instruction-format rendering: seeded templates, options, distractors, and the test-leak guard."""

import pytest

from peftmed.data import VQARecord, load_records
from peftmed.data.instruction import DEFAULT_TEMPLATES, LeakError, render
from peftmed.errors import ConfigError


def _rec(qid, question, answer, answer_type="CLOSED", image_id="img1"):
    return VQARecord(qid=qid, question=question, answer=answer, answer_type=answer_type, image="x.png",
                     image_id=image_id)


TRAIN = [
    _rec("1", "Is there a mass?", "Yes"),
    _rec("2", "Is this PA or AP?", "PA"),
    _rec("3", "Is this axial or coronal?", "axial"),
    _rec("4", "Which organ?", "Liver", "OPEN"),
    _rec("5", "Which side?", "left", "OPEN", image_id="img2"),
    _rec("6", "What modality?", "MRI", "OPEN", image_id="img3"),
    _rec("7", "Where?", "right lung", "OPEN", image_id="img3"),
]
OTHER_TEST = [_rec("t100", "Is the heart enlarged?", "no", image_id="img99")]  # shares nothing with TRAIN


def test_templates_options_and_distractors():
    out = render(TRAIN, seed=0, test_records=OTHER_TEST)
    by = {r.qid: r for r in out}
    assert by["1"].extra["options"] == ["yes", "no"] and "yes, no" in by["1"].question
    assert "Is there a mass?" in by["1"].question and by["1"].extra["original_question"] == "Is there a mass?"
    assert sorted(by["2"].extra["options"]) == ["axial", "pa"]  # a non yes/no closed answer gets a rival
    opts = by["4"].extra["options"]
    assert len(opts) == 4 and "liver" in opts and set(opts) <= {"liver", "left", "mri", "right lung"}
    assert all(r.answer == t.answer for r, t in zip(out, TRAIN))  # answers untouched
    assert by["4"].question == DEFAULT_TEMPLATES["OPEN"][by["4"].extra["template"]].format(
        question="Which organ?", options=", ".join(opts))


def test_choice_is_seeded_per_sample_not_by_order():
    a = render(TRAIN, seed=1, test_records=OTHER_TEST)
    b = render(list(reversed(TRAIN)), seed=1, test_records=OTHER_TEST)
    assert {r.qid: r.question for r in a} == {r.qid: r.question for r in b}
    many = [_rec(str(i), f"Is {i} ok?", "yes") for i in range(40)]
    t0 = [r.extra["template"] for r in render(many, seed=0, test_records=OTHER_TEST)]
    t1 = [r.extra["template"] for r in render(many, seed=1, test_records=OTHER_TEST)]
    assert t0 != t1 and len(set(t0)) > 1


def test_guard_refuses_test_questions_by_qid_and_by_image_and_text():
    test = [_rec("4", "Unrelated?", "no", image_id="other"),  # same qid
            _rec("t9", "  which SIDE ", "left", "OPEN", image_id="img2")]  # same image + normalised text
    with pytest.raises(LeakError) as err:
        render(TRAIN, test_records=test)
    assert "'4'" in str(err.value) and "'5' (test 't9')" in str(err.value)
    kept = render(TRAIN, test_records=test, on_leak="drop")
    assert [r.qid for r in kept] == ["1", "2", "3", "6", "7"]
    # the same question text about another image is not a leak
    assert len(render(TRAIN, test_records=[_rec("t1", "Which side?", "x", "OPEN", image_id="img9")])) == 7


def test_test_records_are_required_and_templates_checked():
    with pytest.raises(TypeError):
        render(TRAIN)
    with pytest.raises(LeakError, match="test_records is empty"):  # [] used to bypass the guard
        render(TRAIN, test_records=[])
    with pytest.raises(ConfigError, match="'Answer:'"):
        render(TRAIN, templates=["Answer:"], test_records=OTHER_TEST)
    with pytest.raises(ConfigError, match="'ignore'"):
        render(TRAIN, test_records=OTHER_TEST, on_leak="ignore")
    own = render(TRAIN, templates=["Q: {question} ({options})"], test_records=OTHER_TEST)
    assert own[0].question == "Q: Is there a mass? (yes, no)"


def test_standard_vqa_rad_split_repeats_three_test_questions(vqa_rad_dir):
    train = load_records("vqa-rad", "train", data_dir=vqa_rad_dir)
    test = load_records("vqa-rad", "test", data_dir=vqa_rad_dir)
    with pytest.raises(LeakError, match=r"3 training record\(s\).*'422' \(test '447'\)"):
        render(train, test_records=test)
    assert len(render(train, test_records=test, on_leak="drop")) == 1795


def test_evaluation_questions_render_with_training_distractors():
    from peftmed.data.instruction import render_questions

    test = [_rec("t1", "Which organ?", "Liver", "OPEN", image_id="img7")]
    (q,) = render_questions(test, TRAIN, seed=0)
    assert "Which organ?" in q.question and "liver" in q.extra["options"] and len(q.extra["options"]) == 4
    assert q.answer == "Liver"


def test_training_drops_repeated_test_questions_with_one_log_line(vqa_rad_dir, caplog):
    from peftmed.data.records import drop_test_questions

    train = load_records("vqa-rad", "train", data_dir=vqa_rad_dir)
    test = load_records("vqa-rad", "test", data_dir=vqa_rad_dir)
    kept = drop_test_questions(train, test)
    assert len(kept) == 1795 and {"422", "943", "78"} & {r.qid for r in kept} == set()
    lines = [r.message for r in caplog.records if "repeat a test question" in r.message]
    assert len(lines) == 1 and "422, 78, 943" in lines[0] and "--train-test-overlap keep" in lines[0]
