"""Reload registered SST-2 champions alone on the GPU: VRAM after load, peak eval VRAM, latency per sample.

Usage (from the repository root, CUDA, MLFLOW_TRACKING_URI at the benchmark store):
    python3 benchmarks/qlora_load.py [variant ...]        (default: qlora fp32)
Prints one row per variant and the qlora/fp32 ratios, measured side by side in this one process.
"""
import gc
import sys
import time

import mlflow
import torch

from hpml import serving
from hpml.data import sst2

MIB = 2 ** 20


def measure(variant: str, texts: list[str], batch_size: int = 32) -> dict:
    export = mlflow.artifacts.download_artifacts(f"models:/hpml-sst2-{variant}@champion")
    export = f"{export.rstrip('/')}/artifacts/export"
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded = serving.load_export(export, device="cuda")
    after_load = (torch.cuda.memory_allocated() - base) / MIB
    serving.predict_sst2(loaded, texts[:batch_size], batch_size)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rows = serving.predict_sst2(loaded, texts, batch_size)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out = {"variant": variant, "vram_after_load_mib": after_load,
           "peak_eval_vram_mib": (torch.cuda.max_memory_allocated() - base) / MIB,
           "ms_per_sample": 1000 * elapsed / len(texts), "n": len(rows),
           "quantization": loaded.meta.get("quantization")}
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(variants: list[str]) -> None:
    texts = sst2.read_tsv(".gpu-data/sst2/dev.tsv")["sentence"]
    results = [measure(v, texts) for v in variants]
    print(f"device: {torch.cuda.get_device_name(0)}; {len(texts)} dev sentences, batch 32, after one warm-up batch")
    print("| variant | 4-bit | VRAM after load MiB | peak eval VRAM MiB | latency ms/sample |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['quantization'] or '-'} | {r['vram_after_load_mib']:.1f} | "
              f"{r['peak_eval_vram_mib']:.1f} | {r['ms_per_sample']:.4f} |")
    if len(results) >= 2:
        a, b = results[0], results[1]
        print(f"ratios {a['variant']}/{b['variant']}: load {a['vram_after_load_mib'] / b['vram_after_load_mib']:.2f}, "
              f"peak eval {a['peak_eval_vram_mib'] / b['peak_eval_vram_mib']:.2f}, "
              f"latency {a['ms_per_sample'] / b['ms_per_sample']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["qlora", "fp32"])
