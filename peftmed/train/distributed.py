"""Running the trainer under ``torchrun``: process group, device, data sharding, model wrapping.

``torchrun --nproc-per-node 2 -m peftmed train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; the trainer
joins the process group (gloo on CPU, nccl on GPU), wraps the model in DistributedDataParallel (or
shards it with FSDP2's ``fully_shard`` with ``strategy=fsdp``), gives each rank its slice of every global batch,
and logs and checkpoints on rank 0 only. A single process needs none of this: ``Dist`` then says
world size 1 and every collective is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..memory.checkpointing import component_blocks
from ..model import find_peft_model
from ..runtime import resolve_device

log = logging.getLogger("peftmed.train")


@dataclass
class Dist:
    """Where this process sits: rank, world size, device, and whether we opened the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over ranks (each rank gets it)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a scalar over ranks (each rank gets it)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. rank 0's clock says stop)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_objects(self, obj):
        """Every rank's ``obj`` as a list on every rank (RNG states for the checkpoint)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self, clean: bool = True) -> None:
        """Leave the process group. After a clean run every rank first meets the others at a barrier, so no
        rank tears its connections down while a peer still has gloo/nccl work in flight (seen once as a
        peer's abort, "terminate called without an active exception"); after an error there is no barrier
        (the other ranks may never arrive)."""
        if self.owns_group and dist.is_initialized():
            if clean and self.enabled:
                dist.barrier()
            dist.destroy_process_group()


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return Dist(device=dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        owns = True
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                owns_group=owns)


class LossModule(nn.Module):
    """``forward(batch)``: the model's ``loss_terms(batch)`` (sum of token losses, token count) when it
    has one, else ``compute_loss(batch)``. DDP/FSDP synchronise gradients only for what runs through a
    wrapper's forward, and VQA models train through these methods."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.by_tokens = callable(getattr(model, "loss_terms", None))

    def forward(self, batch):
        if self.by_tokens:
            loss, count = self.model.loss_terms(batch)
            return loss, count
        return self.model.compute_loss(batch)


def wrap(model: nn.Module, d: Dist, strategy: str) -> nn.Module:
    """The module the training step calls: the loss module, wrapped for DDP or sharded (FSDP2) when distributed."""
    module = LossModule(model)
    if not d.enabled:
        return module
    if strategy in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if strategy == "fsdp":
        return shard(module, model, d)
    raise ConfigError(f"strategy must be auto, ddp or fsdp, got {strategy!r}")


def shard(module: nn.Module, model: nn.Module, d: Dist) -> nn.Module:
    """FSDP2 (``fully_shard``): every layer of every component is one unit, the rest of the model the root.

    Each parameter is split row-wise over the ranks (a DTensor) and gathered for its unit's forward and
    backward; frozen and trainable tensors sit side by side. Works with gloo on CPUs as with nccl on GPUs.
    References the adapter keeps to selected base tensors (LayerNorm-, BitFit-tuning...) are re-pointed
    to the sharded parameters, which replace the originals under the same names.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # peftmed's layers return LayerNorm outputs as views of fresh tensors, never modified in place afterwards (the
    # sharded run's gradients equal the unsharded run's: tests/train/test_fsdp.py); FSDP2 warns about any view
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    before = {id(p): n for n, p in module.named_parameters()}
    peft = find_peft_model(model)
    if peft is not None:
        for component in peft.backbone.components:
            for _, block in component_blocks(peft, component):
                fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    after = dict(module.named_parameters())
    if peft is not None:
        for state in peft.adapters.values():
            for applied in state.applied:
                applied.params = {k: after.get(before.get(id(p), ""), p) for k, p in applied.params.items()}
    return module


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one (a collective: every rank calls it), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor every rank holds) laid out as ``like``: its local shard when ``like`` is a
    DTensor (no communication), else itself."""
    if not is_sharded(like) or is_sharded(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(module, FSDPModule)


def no_sync(module: nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(module: nn.Module, params, max_norm: float) -> torch.Tensor:
    """The global gradient norm (clipped to ``max_norm`` when > 0), computed across FSDP shards."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return full(norm)
