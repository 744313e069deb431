"""One process or many (torchrun): process group, device, and model wrapping (DDP or FSDP2).

`torchrun --nproc_per_node N -m phikit train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; without them the run is a
single process and nothing here talks to a process group. Multi-node runs use torchrun's rendezvous
(`--nnodes 2 --rdzv_backend c10d --rdzv_endpoint HOST:PORT`); checkpoints then need a shared filesystem.
"""
from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join torchrun's process group when launched by it (gloo on CPU, NCCL on CUDA)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible: use device=cpu or device=auto")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, local_rank, world, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(values: list[float], env: DistEnv, op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over all processes, in float64 so sums of token counts stay exact."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward instead of storing its activations.

    Patches each block's forward (rather than wrapping the module) so parameter names stay HF-identical.
    """
    for layer in model.decoder_blocks():
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each decoder block: one compiled graph reused by all layers; the rest stays eager."""
    for layer in model.decoder_blocks():
        layer.compile(dynamic=False)


def wrap_model(model: nn.Module, env: DistEnv, strategy: str, reshard_after_forward: bool = True,
               mixed_precision: torch.dtype | None = None) -> tuple[nn.Module, str]:
    """DDP or FSDP2 (fully_shard per block, then the root) when distributed; the bare model otherwise.

    Returns (wrapped model, strategy used). FSDP2 keeps sharded fp32 master weights; with bf16 it gathers and
    computes in bf16 and reduces gradients in fp32.
    """
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not env.distributed:
            # A one-process mesh is valid FSDP2; it lets the same config run on one device.
            if not dist.is_initialized():
                return model, "single"
        mp = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) \
            if mixed_precision is not None else MixedPrecisionPolicy()
        for layer in model.decoder_blocks():
            fully_shard(layer, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        return model, "fsdp"
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.local_rank] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids), "ddp"
    return model, "single"


def unwrap(model: nn.Module) -> nn.Module:
    """The PhiForCausalLM inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return getattr(model, "module", model)


def no_sync(model: nn.Module, strategy: str, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    import contextlib

    if strategy == "ddp" and not sync:
        return model.no_sync()
    if strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
