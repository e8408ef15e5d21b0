"""The memory-bandwidth roofline a decode step is held to: the device's spec, or a measured copy."""

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


def spec_bandwidth(device_name: str) -> float | None:
    """The vendor's peak bandwidth for a CUDA device name (e.g. "NVIDIA H200"), or None when unknown."""
    for key, value in _SPEC_BYTES_PER_S.items():  # most specific names first
        if key in device_name:
            return value
    return None


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
