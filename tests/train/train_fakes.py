"""A tiny fake Med-VQA model and dataset for the trainer tests (fast on a 2-core CPU).

``FakeVQA`` follows the VQA model contract (image_size, compute_loss(batch), generate(batch)) with a
classifier over a fixed answer list; its images carry the answer (bright = "yes"), so it can learn.
It has dropout, so exact resume needs the RNG states restored.
"""

import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

import peftmed  # noqa: E402
from peftmed.hookspecs import hookimpl  # noqa: E402

ANSWERS = ["yes", "no", "lung", "liver", "brain", "left", "right"]
SIZE = 8


class FakeVQA(nn.Module):
    """image + bag-of-words question -> answer class; vision: q/v linears + norm; head: fc1/fc2."""

    def __init__(self, dim: int = 16, dropout: float = 0.1, vocab: int = 64):
        super().__init__()
        self.image_size = SIZE
        self.vision = nn.ModuleDict({"q": nn.Linear(3 * SIZE * SIZE, dim), "v": nn.Linear(dim, dim),
                                     "norm": nn.LayerNorm(dim)})
        self.words = nn.EmbeddingBag(vocab, dim)
        self.head = nn.ModuleDict({"fc1": nn.Linear(dim, dim), "fc2": nn.Linear(dim, len(ANSWERS))})
        self.drop = nn.Dropout(dropout)
        self.vocab = vocab
        self.fail_at_call: int | None = None  # compute_loss call that raises KeyboardInterrupt (a "kill")
        self.nan_at_call: int | None = None  # compute_loss call that returns NaN
        self.signals_at_call: dict[int, list[int]] = {}  # compute_loss call -> signals this process sends itself
        self.calls = 0
        self.seen: list[str] = []  # qids trained on, in order (checks data sharding)

    def logits(self, batch):
        x = batch["images"].float().flatten(1) / 255.0  # (B, 3*S*S)
        h = self.vision["norm"](self.vision["v"](F.gelu(self.vision["q"](x))))
        # crc32, not hash(): python's str hash differs between processes (the DDP test spawns two)
        ids = [torch.tensor([zlib.crc32(w.encode()) % self.vocab for w in q.lower().split()] or [0])
               for q in batch["questions"]]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        h = h + self.words(torch.cat(ids), offsets)
        return self.head["fc2"](self.drop(F.gelu(self.head["fc1"](h))))

    def compute_loss(self, batch):
        self.calls += 1
        self.seen.extend(batch["qids"])
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        for signum in self.signals_at_call.get(self.calls, ()):
            os.kill(os.getpid(), signum)
        target = torch.tensor([ANSWERS.index(a) for a in batch["answers"]])
        loss = F.cross_entropy(self.logits(batch), target)
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            loss = loss * float("nan")
        return loss

    def generate(self, batch, max_new_tokens=10, num_beams=3):
        return [ANSWERS[i] for i in self.logits(batch).argmax(-1).tolist()]


FAKE_BACKBONE = peftmed.Backbone(
    name="fake-vqa",
    components={"vision": "vision", "decoder": "head"},
    roles={"attn.q": r"^q$", "attn.v": r"^v$", "mlp.up": r"^fc1$", "mlp.down": r"^fc2$"},
    builder=FakeVQA,
    description="trainer tests",
)
OTHER_BACKBONE = peftmed.Backbone(name="fake-vqa-2", components=FAKE_BACKBONE.components,
                                  roles=FAKE_BACKBONE.roles, builder=FakeVQA)


class FakePlugin:
    @hookimpl
    def register_backbones(self, register):
        register(FAKE_BACKBONE)
        register(OTHER_BACKBONE)


def make_records(n: int = 48, seed: int = 0, prefix: str = "q"):
    """Questions whose image brightness gives the answer (closed: yes/no; open: an organ)."""
    from peftmed.data import VQARecord

    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        closed = i % 2 == 0
        answer = ANSWERS[i % 4 // 2] if closed else ANSWERS[2 + i % 3]
        level = 40 + 30 * ANSWERS.index(answer)
        noise = torch.randint(0, 20, (SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
        pixels = (noise + level).numpy()
        records.append(VQARecord(
            qid=f"{prefix}{i}", question="is there a lesion" if closed else "which organ is shown",
            answer=answer, answer_type="CLOSED" if closed else "OPEN",
            image=lambda p=pixels: Image.fromarray(p), image_id=f"img{i}"))
    return records


def build_fake(recipe="vision=lora(r=4,dropout=0.1,kernel=torch)+layernorm decoder=ffn", seed=0, backbone="fake-vqa",
               registry=None, **options):
    """A seeded FakeVQA with ``recipe`` applied (same seed -> same base weights)."""
    torch.manual_seed(seed)
    bb = (registry or peftmed.default_registry()).backbone(backbone)
    return peftmed.apply(bb.build(**options), recipe, backbone=bb, registry=registry, keep_base=False)


def bare_fake(seed=0, registry=None):
    """The same seeded FakeVQA without an adapter (to load a saved one onto)."""
    torch.manual_seed(seed)
    return (registry or peftmed.default_registry()).backbone("fake-vqa").build()
