"""torch.distributed plumbing: process group from torchrun's environment, DDP or FSDP2 wrapping, reductions.

One process per device; gloo on the CPU, NCCL on CUDA. Without torchrun (no WORLD_SIZE) everything here is a
no-op, so the single-process path is the same code.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import resolve_device

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(strategy: str = "ddp", device: str | None = None) -> Dist:
    """Join the process group that torchrun describes (or none); pick this rank's device."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev, strategy=strategy)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values, d: Dist) -> list[float]:
    """Sum a few numbers over ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if d.enabled:
        t = t.to(d.device) if d.device.type == "cuda" else t
        dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def wrap(model, d: Dist):
    """The module to call for training: the model itself, DDP around it, or the model sharded with FSDP2.

    FSDP2 shards each decoder block and each ViT block as its own unit (gathered just before use), then the rest.
    Freeze the stage's parameters before wrapping: both wrappers register gradient hooks for what trains.
    """
    if not d.enabled:
        return model
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        # a micro-batch without images leaves the ViT unused: DDP must be told to expect that
        return DDP(model, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    for block in model.transformer.visual.transformer.resblocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def no_sync(wrapped, d: Dist, skip: bool):
    """Hold the gradient all-reduce during the first micro-batches of an accumulation; sync on the last."""
    if not (d.enabled and skip):
        yield
        return
    if d.strategy == "ddp":
        with wrapped.no_sync():
            yield
        return
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)
