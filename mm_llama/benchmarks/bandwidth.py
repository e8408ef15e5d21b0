"""Device limits a benchmark is held to: memory bandwidth (the spec, or a measured copy) and bf16 FLOP/s."""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import torch

from mm_llama.benchmarks.timing import synchronize

# Peak memory bandwidth (bytes/s) of data-centre GPUs by the name CUDA reports, from the vendors' sheets.
_SPEC_BYTES_PER_S = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 SXM": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
}


@dataclass(frozen=True)
class Roofline:
    bytes_per_s: float
    source: str  # "spec (NAME)" or "measured copy"


# Dense bf16 tensor-core peaks (FLOP/s), from the same sheets.
_SPEC_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def _spec(table: dict[str, float], device_name: str) -> float | None:
    """The first entry whose key the CUDA device name holds (tables list the most specific names first)."""
    return next((value for key, value in table.items() if key in device_name), None)


def spec_bandwidth(device_name: str) -> float | None:
    """The vendor's peak bandwidth for a CUDA device name (e.g. "NVIDIA H200"), or None when unknown."""
    return _spec(_SPEC_BYTES_PER_S, device_name)


def peak_bf16_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known CUDA device; None on CPU or an unknown GPU."""
    return _spec(_SPEC_BF16_FLOPS, torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def measured_copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes moved per second by a device-to-device copy (each byte read once and written once)."""
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages, untimed
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def roofline(device: torch.device) -> Roofline:
    """The spec bandwidth of a known CUDA device, else the best measured copy on `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = spec_bandwidth(name)
        if spec is not None:
            return Roofline(spec, f"spec ({name})")
    return Roofline(measured_copy_bandwidth(device), "measured copy")
