"""GPU memory measurement helpers: peaks, resets, freeing (all in MiB)."""
from __future__ import annotations

import gc

import torch

MIB = 2 ** 20


def mib(n_bytes: float) -> float:
    return n_bytes / MIB


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_train(device: str) -> dict[str, float]:
    """Absent on CPU (not zero): a missing VRAM metric means 'not measured', which the report shows as —."""
    from hpml import tracking

    if device != "cuda":
        return {}
    torch.cuda.synchronize()
    return {tracking.M_PEAK_TRAIN_ALLOC: mib(torch.cuda.max_memory_allocated()),
            tracking.M_PEAK_TRAIN_RESERVED: mib(torch.cuda.max_memory_reserved())}


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
