"""Process group setup and FSDP2 sharding for ``torchrun --nproc_per_node N``.

Without torchrun's environment (RANK, WORLD_SIZE) everything here is a no-op and the
training loop runs as one plain process. With it: gloo on the CPU, nccl on GPUs, one
device per rank, and every decoder layer plus the root wrapped with FSDP2's ``fully_shard``
(parameters, gradients and optimizer state sharded across ranks), built from a meta-device
skeleton so that no rank but 0 ever holds the whole model (``shard_model``).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe2edge.distill.errors import DistillError
from moe2edge.memory import hand_back_freed_memory

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
    hand_back_freed_memory()
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str, key: str) -> torch.dtype:
    """``torch.bfloat16`` for ``"bfloat16"``; a DistillError naming ``key`` otherwise."""
    if name not in DTYPES:
        raise DistillError(f"{key}={name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def to_meta(model: torch.nn.Module) -> None:
    """Swap every parameter and buffer of ``model`` for an empty meta tensor, in place.

    ``model.to("meta")`` would untie tied weights (a CPU tensor cannot become a meta one in
    place, so each module gets its own new Parameter); this keeps one Parameter per tensor.
    """
    swapped: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and not param.is_meta:
                if id(param) not in swapped:
                    empty = torch.empty_like(param, device="meta")
                    swapped[id(param)] = torch.nn.Parameter(empty, param.requires_grad)
                module._parameters[name] = swapped[id(param)]
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device="meta")


def shard_model(
    model: torch.nn.Module,
    info: DistInfo,
    param_dtype: str = "float32",
    reduce_dtype: str = "float32",
) -> torch.nn.Module:
    """FSDP2 from a meta-device skeleton, initialised from rank 0's weights. Call on all ranks.

    Rank 0's ``model`` holds the initial weights (a seeded random init or a loaded HF
    checkpoint); the other ranks' may be built on the meta device (``distill_student`` does),
    so no rank but 0 ever holds the whole model. Rank 0 keeps its full state dict on the CPU,
    every rank's model becomes a meta skeleton, each decoder layer and then the root (embeddings,
    norm, head) is wrapped with ``fully_shard`` under a ``MixedPrecisionPolicy`` (parameters
    gathered in ``param_dtype`` for compute, gradients reduced in ``reduce_dtype``, the sharded
    master weights stay fp32), ``to_empty`` allocates this rank's shards only, and
    ``set_model_state_dict(broadcast_from_rank0)`` streams rank 0's tensors one at a time into
    every rank's shards. Buffers (not sharded; some, like rotary ``inv_freq``, are not in the
    state dict) are broadcast from rank 0 as well. The result is rank 0's init, bit for bit,
    on every world size: the same weights a single process starts from.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=dtype_named(param_dtype, "param_dtype"),
        reduce_dtype=dtype_named(reduce_dtype, "reduce_dtype"),
    )
    full_state: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if info.is_main:
        full_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        buffers = {k: v.detach().cpu() for k, v in model.named_buffers()}
    to_meta(model)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=info.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    del full_state
    buffers = broadcast_object(buffers, info)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
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


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (``getrusage`` ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes / KiB


def full_tensor(x):
    """A plain tensor from a DTensor (e.g. FSDP2's gradient norm), or ``x`` itself."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
