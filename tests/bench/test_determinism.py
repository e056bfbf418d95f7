"""A bench's figures do not depend on when it runs on one machine: the transfer protocol with two seeds, run twice
(once with two jobs side by side, once one at a time), gives identical scores, predictions and forgetting figures.
(What differs between machines, and by how much, is measured in docs/bench.md.)"""

import json

import pytest

from peftmed.bench import run_bench

SCORES = ("acc_closed", "acc_open", "acc_overall", "closed_f1", "open_token_f1", "source_acc_overall",
          "final_loss", "trainable")


def _run(mini, out, workers):
    config = mini(out, recipes=["*=frozen", "*=layernorm", "fusion=lora(r=2)"], peft=False, isolate=True,
                  workers=workers, seeds=(0, 1), transfer=({"domain": "ct"}, {"domain": "mr"}), source_steps=4,
                  source_batch_size=4, source_eval_samples=8, steps=3, source_lr=2e-3)
    return run_bench(config, echo=lambda _: None)


@pytest.mark.slow
def test_two_runs_on_one_machine_give_identical_figures(tmp_path, mini):
    a = _run(mini, tmp_path / "a", workers=2)
    b = _run(mini, tmp_path / "b", workers=1)
    for x, y in ((a["rows"], b["rows"]), (a["summary"], b["summary"])):
        key = lambda r: (r["label"], r["provider"], r.get("seed", -1))  # noqa: E731
        for ra, rb in zip(sorted(x, key=key), sorted(y, key=key)):
            assert key(ra) == key(rb)
            for k in SCORES + ("forgetting", "p_vs_frozen", "ci_low", "ci_high"):
                va, vb = ra.get(k), rb.get(k)
                assert va == vb or (va != va and vb != vb), (key(ra), k, va, vb)  # NaN (frozen's loss) equals NaN
    preds_a = sorted(p.name for p in (tmp_path / "a" / "predictions").iterdir())
    assert preds_a == sorted(p.name for p in (tmp_path / "b" / "predictions").iterdir())
    assert any(name.endswith(".source.json") for name in preds_a)  # the forgetting predictions are kept too
    for name in preds_a:
        assert json.loads((tmp_path / "a" / "predictions" / name).read_text()) == \
            json.loads((tmp_path / "b" / "predictions" / name).read_text()), name
    assert a["meta"]["workers"] == 2 and b["meta"]["workers"] == 1
