"""Exactness of the token-normalised loss on the real miss-tiny (dropout 0): one process with batch 8, two
processes with batch 4 each (DDP, gloo over loopback) and one process with batch 4 x 2 accumulation steps
compute the same gradient (within 1e-6 of its norm) and, after 20 steps, the same adapter (within 1e-5).

A per-micro-batch mean would weight a token of a short-answer micro-batch more than one of a long-answer
micro-batch; the trainer divides the sum of token losses by the global number of answer tokens instead.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

RECIPE = "fusion=lora(r=4,kernel=torch) decoder=lora(r=4,kernel=torch)+layernorm"
OPTIONS = dict(hidden_dropout=0.0, attention_dropout=0.0)


def _setup(registry=None):
    import peftmed
    from peftmed.data import VQADataset, load_records

    torch.set_num_threads(1)
    records = load_records("phantom", "train", n_images=16, registry=registry)
    texts = [t for r in records for t in (r.question, r.answer)]
    torch.manual_seed(0)
    model = peftmed.build_backbone("miss-tiny", texts=texts, **OPTIONS)
    pm = peftmed.apply(model, RECIPE, keep_base=False)
    return pm, VQADataset(records, 64)


def _train(steps, batch_size, grad_accum, out=None):
    from peftmed.train import TrainConfig, Trainer

    pm, data = _setup()
    config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, adam_eps=1e-3,
                         max_grad_norm=0.0, warmup_steps=0, progress=False, seed=2)
    result = Trainer(pm, data, config, output_dir=out).train()
    grads = {k: p.grad.detach().clone() for k, p in pm.adapter_tensors().items()}  # the last step's gradient
    values = {k: p.detach().clone() for k, p in pm.adapter_tensors().items()}
    return grads, values, result.losses


def _worker(rank, world, port, out, steps):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    grads, values, losses = _train(steps, 4, 1)
    if rank == 0:
        torch.save({"grads": grads, "values": values, "losses": torch.tensor(losses)}, os.path.join(out, "rank0.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp(tmp_path, steps):
    out = tmp_path / f"ddp{steps}"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out), steps), nprocs=2, join=True)
    return torch.load(out / "rank0.pt", weights_only=True)


def _close_in_norm(a: dict, b: dict, rel: float):
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in a.values()))
    diff = torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a))
    assert float(diff) <= rel * float(norm), f"difference {float(diff):.3g} vs {rel} x norm {float(norm):.3g}"


@pytest.mark.slow
def test_one_process_two_processes_and_accumulation_agree_on_the_real_model(tmp_path):
    one_grads, _, one_losses = _train(1, 8, 1)
    acc_grads, _, acc_losses = _train(1, 4, 2)
    ddp = _ddp(tmp_path, 1)
    _close_in_norm(one_grads, acc_grads, 1e-6)
    _close_in_norm(one_grads, ddp["grads"], 1e-6)
    assert acc_losses == pytest.approx(one_losses, rel=1e-6)
    assert ddp["losses"].tolist() == pytest.approx(one_losses, rel=1e-6)

    _, one, _ = _train(20, 8, 1)
    _, acc, _ = _train(20, 4, 2)
    ddp = _ddp(tmp_path, 20)
    for name, value in one.items():
        torch.testing.assert_close(acc[name], value, atol=1e-5, rtol=0, msg=lambda m, k=name: f"{k}: {m}")
        torch.testing.assert_close(ddp["values"][name], value, atol=1e-5, rtol=0, msg=lambda m, k=name: f"{k}: {m}")


def test_the_token_normalised_loss_differs_from_a_mean_of_micro_batch_means():
    """The check above can fail: micro-batches with different answer lengths weigh tokens differently."""
    pm, data = _setup()
    from peftmed.data import collate

    items = sorted((data[i] for i in range(len(data))), key=lambda it: len(it["answer"]))
    items = items[:4] + items[-4:]  # short answers, then long ones
    first, second = collate(items[:4]), collate(items[4:])
    (s1, n1), (s2, n2) = pm.loss_terms(first), pm.loss_terms(second)
    assert n1 != n2  # phantom answers vary in length
    token_mean = (s1 + s2) / (n1 + n2)
    micro_mean = (s1 / n1 + s2 / n2) / 2
    assert abs(float(token_mean - micro_mean)) > 1e-4
    torch.testing.assert_close(pm.compute_loss(collate(items)), token_mean, rtol=1e-6, atol=0)
