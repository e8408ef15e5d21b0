"""CUDA-only checks (skipped without a GPU): fused AdamW, CUDA RNG in checkpoints, FSDP2 over NCCL."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mm_llama.train.checkpointing import capture_rng, load_checkpoint, restore_rng, save_checkpoint, trainable_state_dict
from mm_llama.train.distributed import shard_frozen_lm
from mm_llama.train.nonfinite import NonFiniteGuard, guarded_step
from mm_llama.train.optim import build_optimizer
from mm_llama.train.recipe import OptimConfig
from tests.train.helpers import loss_fn, tiny_batch, tiny_model

pytestmark = pytest.mark.gpu


def _cuda_batch():
    tokens, labels, images = tiny_batch(batch=2)
    return tokens.cuda(), labels.cuda(), images.to("cuda")


def test_fused_adamw_steps_on_cuda_under_bf16_autocast() -> None:
    model = tiny_model().cuda()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    assert all(g["fused"] for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model, *_cuda_batch())
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert guarded_step(opt, trainable, loss=loss, step=0, guard=NonFiniteGuard(3), grad_clip=1.0).applied
    params = dict(model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in params.items() if not p.requires_grad)  # frozen identical
    assert any(not torch.equal(p, before[n]) for n, p in params.items() if p.requires_grad)


def test_cuda_rng_and_optimizer_state_round_trip(tmp_path: Path) -> None:
    model = tiny_model().cuda()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    loss_fn(model, *_cuda_batch()).backward()
    opt.step()
    torch.cuda.manual_seed(5)
    rng = capture_rng()
    assert "cuda" in rng
    save_checkpoint(tmp_path, 1, trainable_state=trainable_state_dict(model), optimizer=opt, rng=rng)
    first = torch.rand(4, device="cuda")
    ckpt = load_checkpoint(tmp_path)
    restore_rng(ckpt.rng)
    assert torch.equal(torch.rand(4, device="cuda"), first)
    opt2 = build_optimizer(model, OptimConfig(lr=1e-3))
    opt2.load_state_dict(ckpt.optimizer)  # CPU-loaded state moves to the parameters' device
    state = next(iter(opt2.state.values()))
    assert state["exp_avg"].device.type == "cuda"


def test_fsdp2_shards_the_frozen_lm_over_nccl() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        reference = tiny_model().cuda()
        model = tiny_model().cuda()
        assert shard_frozen_lm(model.decoder) == ["layers.0", "layers.1.layer", "tok_embeddings.embedding", "output"]
        assert type(model.decoder.layers[0].attention.wq.weight).__name__ == "DTensor"
        batch = _cuda_batch()
        loss, ref_loss = loss_fn(model, *batch), loss_fn(reference, *batch)
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss)
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()
