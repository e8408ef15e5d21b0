"""One process or many (torchrun): process group set-up, DDP for what trains, FSDP2 for a frozen LM.

Under `torchrun --nproc_per_node N`, `DistributedContext.from_env()` reads RANK / WORLD_SIZE /
LOCAL_RANK and initialises the process group (NCCL on CUDA, gloo on CPU); without torchrun it is a
no-op single-process context, so the trainer has one code path.

- `wrap_trainable(model)`: DDP over the trainable parameters only. DDP itself skips parameters without
  `requires_grad` when it buckets gradients, but it would still broadcast every parameter and buffer
  from rank 0 at construction (gigabytes for a frozen 8B LM) and re-broadcast buffers each forward;
  so the frozen parameters and all buffers are registered as ignored and `broadcast_buffers=False`.
  The frozen LM must therefore be loaded identically on every rank (it is: the same checkpoint); the
  trainable parameters are broadcast from rank 0, so their random initialisation needs no seeding
  discipline.
- `shard_frozen_lm(decoder)`: FSDP2 `fully_shard` on each frozen decoder layer (inside fusion wrappers:
  the wrapped layer, never the trainable cross-attention), the frozen embedding table and the output
  head, so each rank holds 1/N of the LM. Works on CPU with gloo in torch 2.11 (tested) and on CUDA
  with NCCL. Call it before `wrap_trainable`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from mm_llama.train.optim import unwrap

T = TypeVar("T", torch.Tensor, float)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun, "
                         "which sets RANK, WORLD_SIZE and LOCAL_RANK") from None


@dataclass
class DistributedContext:
    """Rank, world size, this process' device and the process-group backend (None: single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False  # True when this context initialised the process group (and destroys it)

    @classmethod
    def from_env(cls, device: str = "auto") -> DistributedContext:
        """Set up from torchrun's environment. `device`: `auto` (CUDA when available), `cpu` or `cuda`.

        Each rank uses `cuda:LOCAL_RANK`; gloo is used on CPU and NCCL on CUDA.
        """
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available; use device=cpu (train.device=cpu)")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local = _env_int("LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} / WORLD_SIZE={world} are inconsistent; launch with torchrun")
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                                 "use --nproc_per_node at most the number of GPUs")
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if world == 1:
            return cls(0, 1, 0, dev, None, False)
        backend = "nccl" if use_cuda else "gloo"
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend(), False)
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {missing} are not set; launch with torchrun --nproc_per_node N")
        dist.init_process_group(backend, rank=rank, world_size=world, device_id=dev if use_cuda else None)
        return cls(rank, world, local, dev, backend, True)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, saves checkpoints and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def all_reduce_mean(value: T) -> T:
    """The mean of `value` over ranks: a tensor (a new one, on its own device) or a Python float."""
    if not _active():
        return value.clone() if isinstance(value, torch.Tensor) else float(value)
    if isinstance(value, torch.Tensor):
        device = _collective_device()
        out = value.detach().to(device=device, dtype=torch.float64 if not value.is_floating_point() else value.dtype,
                                copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / dist.get_world_size()).to(value.device)
    out = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return float(out.item() / dist.get_world_size())


def any_true(flag: bool) -> bool:
    """True when `flag` is True on any rank (e.g. a stop signal that reached only some ranks)."""
    if not _active():
        return bool(flag)
    out = torch.tensor(int(bool(flag)), device=_collective_device())
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return bool(out.item())


def wrap_trainable(model: nn.Module, ctx: DistributedContext | None = None, *,
                   find_unused_parameters: bool = False) -> nn.Module:
    """DDP over `model`'s trainable parameters (see the module docstring); the model itself when
    running in one process or when nothing trains. Frozen parameters and buffers are never synced."""
    if not _active():
        return model
    inner = unwrap(model)
    if not any(p.requires_grad for p in inner.parameters()):
        return model
    ignored = [n for n, p in inner.named_parameters(remove_duplicate=False) if not p.requires_grad]
    ignored += [n for n, _ in inner.named_buffers(remove_duplicate=False)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(inner, ignored)
    device = ctx.device if ctx is not None else _collective_device()
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=find_unused_parameters,
    )


def _frozen_or_raise(module: nn.Module, where: str) -> None:
    trains = [n for n, p in module.named_parameters() if p.requires_grad]
    if trains:
        raise ValueError(f"shard_frozen_lm: {where} has trainable parameters ({trains[:3]}); FSDP here shards only the "
                         "frozen LM — set distributed.fsdp_frozen_lm=false or leave decoder out of model.train")


def shard_frozen_lm(decoder: nn.Module, ctx: DistributedContext | None = None, *,
                    reshard_after_forward: bool = True) -> list[str]:
    """FSDP2-shard the frozen parts of a Llama decoder (a `LlamaDecoder`, possibly with fusion wrappers);
    returns the names of the sharded modules. A no-op (empty list) without a process group; with one
    of size 1 it still shards (1-way), which exercises the same code path on one GPU.

    Sharded: each decoder layer (the wrapped layer inside a `FusionLayer`), the token embedding table
    (the frozen `embedding` inside a `FusionEmbedding`) and the output head — the last two only when
    they are not tied (a tied table is used by two modules and stays replicated). Every sharded module
    must be frozen. Call before `wrap_trainable`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"shard_frozen_lm expects a Llama decoder with a `layers` ModuleList, got {type(decoder).__name__}")
    device_type = ctx.device.type if ctx is not None else _collective_device().type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    targets: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(layers):
        inner = getattr(layer, "layer", None)
        if isinstance(inner, nn.Module) and hasattr(layer, "fusion"):
            targets.append((f"layers.{i}.layer", inner))
        else:
            targets.append((f"layers.{i}", layer))
    embed = getattr(decoder, "tok_embeddings", None)
    table = getattr(embed, "embedding", embed)
    output = getattr(decoder, "output", None)
    tied = isinstance(table, nn.Embedding) and isinstance(output, nn.Linear) and output.weight is table.weight
    if isinstance(table, nn.Embedding) and not tied:
        targets.append(("tok_embeddings" + (".embedding" if table is not embed else ""), table))
    if isinstance(output, nn.Linear) and not tied:
        targets.append(("output", output))
    for name, module in targets:
        _frozen_or_raise(module, name)
    for _, module in targets:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return [name for name, _ in targets]


__all__ = [
    "DistributedContext", "all_reduce_mean", "any_true", "barrier", "is_main", "shard_frozen_lm", "wrap_trainable",
]
