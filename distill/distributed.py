"""Process group setup and FSDP2 sharding for ``torchrun --nproc_per_node N``.

Without torchrun's environment (RANK, WORLD_SIZE) everything here is a no-op and the
training loop runs as one plain process. With it: gloo on the CPU, nccl on GPUs, one
device per rank, and every decoder layer plus the root wrapped with FSDP2's ``fully_shard``
(parameters, gradients and optimizer state sharded across ranks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe2edge.distill.errors import DistillError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise DistillError(f"device={preference!r}: use auto, cpu or cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise DistillError("device=cuda but CUDA is not available here; use device=cpu or auto")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world == 1 and not dist.is_initialized():
        return DistInfo(device=dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        log.info("rank %d of %d on %s", dist.get_rank(), dist.get_world_size(), dev)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer block list of an HF causal LM (also inside a peft wrapper)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h"):
            return module
    raise DistillError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """FSDP2: shard each decoder layer, then the rest (embeddings, norm, head) at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` as a list on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def raise_together(error: str | None, info: DistInfo) -> None:
    """Raise rank 0's DistillError on every rank, so no rank is left waiting in a collective."""
    error = broadcast_object(error, info)
    if error:
        raise DistillError(error)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def full_tensor(x):
    """A plain tensor from a DTensor (e.g. FSDP2's gradient norm), or ``x`` itself."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
