"""GPU memory measurement: peak train VRAM, VRAM after a fresh load, peak eval VRAM (all in MiB)."""
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


def reload_eval_vram(export_dir: str, prep, cfg) -> dict[str, float]:
    """Reload the export alone on the GPU (nothing else resident) and run the eval loop once."""
    from hpml import serving, tracking
    from hpml.data.batching import Collator
    from hpml.variants import Batching

    free_cuda()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded = serving.load_export(export_dir, device="cuda")
    after_load = mib(torch.cuda.memory_allocated() - base)
    feats = prep.eval_features
    keep = [c for c in feats.column_names if c not in ("example_id", "offset_mapping", "length")]
    feats = feats.select_columns(keep)
    collate = Collator(loaded.tokenizer.pad_token_id, cfg.max_length, Batching())
    with torch.inference_mode():
        for i in range(0, len(feats), cfg.eval_batch_size):
            batch = collate([feats[j] for j in range(i, min(i + cfg.eval_batch_size, len(feats)))])
            batch = {k: v.cuda() for k, v in batch.items() if k in ("input_ids", "token_type_ids", "attention_mask")}
            with torch.autocast("cuda", dtype=torch.float16, enabled=bool(loaded.meta.get("quantization"))):
                loaded.model(**batch)
    torch.cuda.synchronize()
    peak = mib(torch.cuda.max_memory_allocated() - base)
    del loaded
    free_cuda()
    return {tracking.M_VRAM_AFTER_LOAD: after_load, tracking.M_PEAK_EVAL_VRAM: peak}
