"""The body of the 2-process gloo test (run by `torch.multiprocessing.spawn` from test_distributed.py).

Each rank writes `rank{R}.json` with what the test asserts: collectives, DDP gradients against a
one-process full-batch reference, and short training curves with DDP alone and with the frozen LM
FSDP2-sharded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mm_llama.train.distributed import (
    DistributedContext, all_reduce_mean, any_true, barrier, is_main, shard_frozen_lm, wrap_trainable,
)
from mm_llama.train.optim import build_optimizer, check_optimizer_params
from mm_llama.train.recipe import OptimConfig
from tests.train.helpers import loss_fn, select, tiny_batch, tiny_model

STEPS = 3
# A large eps keeps Adam from turning float-noise gradients (a gate whose true gradient is ~0 gets
# ±5e-6 from summation order) into lr-sized steps, so the trained parameters can be compared too.
OPTIM = OptimConfig(lr={"image.encoder": 1e-3, "image.fusion": 3e-3}, weight_decay=0.01, eps=1e-3)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _curve(model: torch.nn.Module, params_of: torch.nn.Module, rows: slice | None) -> tuple[list[float], Any]:
    """Train `STEPS` steps; returns the (rank-averaged) losses and the trainable parameters."""
    opt = build_optimizer(params_of, OPTIM)
    check_optimizer_params(opt, params_of)
    losses = []
    for step in range(STEPS):
        tokens, labels, images = tiny_batch(batch=4, seed=100 + step)
        if rows is not None:
            tokens, labels, images = tokens[rows], labels[rows], select(images, rows)
        loss = loss_fn(model, tokens, labels, images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params_of.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(all_reduce_mean(loss.detach()).item() if rows is not None else loss.item())
    trained = {n: p.detach().clone() for n, p in params_of.named_parameters() if p.requires_grad}
    return losses, trained


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    with DistributedContext.from_env(device="cpu") as ctx:
        result.update(rank=ctx.rank, world=ctx.world_size, backend=ctx.backend, is_main=is_main())
        result["mean_float"] = all_reduce_mean(float(rank + 1))
        result["mean_tensor"] = all_reduce_mean(torch.tensor([float(rank), 2.0 * rank])).tolist()
        result["any_true"] = any_true(rank == 1)
        result["none_true"] = any_true(False)
        rows = slice(2 * rank, 2 * rank + 2)

        # gradients: DDP over each rank's half == one process on the whole batch
        reference, model = tiny_model(seed=0), tiny_model(seed=0)
        tokens, labels, images = tiny_batch(batch=4, seed=7)
        ddp = wrap_trainable(model, ctx)
        result["wrapped"] = type(ddp).__name__
        loss_fn(ddp, tokens[rows], labels[rows], select(images, rows)).backward()
        loss_fn(reference, tokens, labels, images).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        result["grad_max_diff"] = _max_diff(grads, ref_grads)
        result["grad_scale"] = max(float(g.abs().max()) for g in ref_grads.values())
        result["frozen_grads"] = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)

        # loss curves: one process on the global batch, DDP, DDP + FSDP2-sharded frozen LM
        ref_model = tiny_model(seed=0)
        frozen_before = {n: p.detach().clone() for n, p in ref_model.named_parameters() if not p.requires_grad}
        ref_losses, ref_params = _curve(ref_model, ref_model, None)
        ddp_model = tiny_model(seed=0)
        ddp_losses, ddp_params = _curve(wrap_trainable(ddp_model, ctx), ddp_model, rows)
        fsdp_model = tiny_model(seed=0)
        sharded = shard_frozen_lm(fsdp_model.decoder, ctx)
        wq = fsdp_model.decoder.layers[0].attention.wq.weight
        result["sharded"] = sharded
        result["sharded_type"] = type(wq).__name__
        result["local_rows"] = int(wq.to_local().shape[0]) if hasattr(wq, "to_local") else int(wq.shape[0])
        fsdp_losses, fsdp_params = _curve(wrap_trainable(fsdp_model, ctx), fsdp_model, rows)
        frozen_after = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                        for n, p in fsdp_model.named_parameters() if not p.requires_grad}
        result["frozen_unchanged"] = all(torch.equal(frozen_after[n], v) for n, v in frozen_before.items())
        result.update(ref_losses=ref_losses, ddp_losses=ddp_losses, fsdp_losses=fsdp_losses,
                      ddp_param_diff=_max_diff(ddp_params, ref_params), fsdp_param_diff=_max_diff(fsdp_params, ref_params))
        barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
