"""Two gloo processes on CPU: collectives, DDP over the trainable part, FSDP2 on the frozen LM."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from mm_llama.train.distributed import DistributedContext, all_reduce_mean, any_true, shard_frozen_lm, wrap_trainable
from tests.train import dist_worker
from tests.train.helpers import tiny_model

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(dist_worker.run, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_collectives(results: list[dict[str, Any]]) -> None:
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == WORLD and res["backend"] == "gloo"
        assert res["is_main"] == (r == 0)
        assert res["mean_float"] == 1.5
        assert res["mean_tensor"] == [0.5, 1.0]
        assert res["any_true"] is True and res["none_true"] is False


def test_ddp_gradients_equal_one_process_on_the_full_batch(results: list[dict[str, Any]]) -> None:
    for res in results:
        assert res["wrapped"] == "DistributedDataParallel"
        assert res["grad_scale"] > 1e-3
        assert res["grad_max_diff"] < 1e-5 * res["grad_scale"]  # summation order differs
        assert res["frozen_grads"] == 0


def test_ddp_loss_curve_equals_one_process(results: list[dict[str, Any]]) -> None:
    for res in results:
        assert res["ddp_losses"] == pytest.approx(res["ref_losses"], rel=1e-5)
        assert res["ddp_param_diff"] < 1e-5


def test_fsdp2_frozen_lm_on_cpu(results: list[dict[str, Any]]) -> None:
    """fully_shard works on CPU with gloo (torch 2.11): same curve, LM sharded and unchanged."""
    for res in results:
        assert res["sharded"] == ["layers.0", "layers.1.layer", "tok_embeddings.embedding", "output"]
        assert res["sharded_type"] == "DTensor"
        assert res["local_rows"] == 64 // WORLD  # wq [64, 64] split along dim 0
        assert res["fsdp_losses"] == pytest.approx(res["ref_losses"], rel=1e-5)
        assert res["fsdp_param_diff"] < 1e-5
        assert res["frozen_unchanged"]


def test_single_process_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = DistributedContext.from_env(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.is_distributed) == (0, 1, None, True, False)
    model = tiny_model()
    assert wrap_trainable(model, ctx) is model
    assert shard_frozen_lm(model.decoder, ctx) == []
    assert all_reduce_mean(2.5) == 2.5 and torch.equal(all_reduce_mean(torch.ones(2)), torch.ones(2))
    assert any_true(True) and not any_true(False)
    ctx.barrier()


def test_bad_environment_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        DistributedContext.from_env(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        DistributedContext.from_env(device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            DistributedContext.from_env(device="cuda")
