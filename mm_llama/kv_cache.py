"""Preallocated key/value cache for batched, left-padded incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer in fixed slots `[0, max_len)`, shared bookkeeping per batch row.

    Rows of a batch advance together (prompts are left-padded), so one `length` counts the filled slots;
    `valid [B, max_len]` marks which slots hold real tokens and `next_position [B]` is each row's next
    RoPE position (padding does not advance it).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        # State that fusion layers keep across decode steps (e.g. image keys/values computed at prefill).
        self.fusion_state: dict[str, object] = {}

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reserve(self, valid: torch.Tensor) -> tuple[int, int]:
        """Claim the next `T` slots for new tokens `valid [B, T]`; returns `(start, end)`.

        Call once per forward pass, before the layers write; `advance` commits the slots afterwards.
        """
        start, end = self.length, self.length + valid.shape[1]
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions but {end} are needed; "
                "build a larger cache or generate fewer tokens"
            )
        self.valid[:, start:end] = valid
        return start, end

    def advance(self, valid: torch.Tensor) -> None:
        self.length += valid.shape[1]
        self.next_position += valid.sum(dim=1)

    def write(
        self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k/v [B, Hkv, T, hd]` at slots `[start, start+T)`; return all keys/values up to there.

        With a tensor `start` (slot indices `[T]`, the static decode step) the write is an `index_copy_`
        and every slot comes back (`[B, Hkv, max_len, hd]`): shapes never change, `valid` masks the rest.
        """
        if isinstance(start, torch.Tensor):
            self.keys[layer].index_copy_(2, start, k)
            self.values[layer].index_copy_(2, start, v)
            return self.keys[layer], self.values[layer]
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
