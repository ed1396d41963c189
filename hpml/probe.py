"""vram_probe: the study's training-step VRAM method, plus where the memory goes (params/grads/optimizer/rest).

The probed step is a real Trainer step of the variant, built by the same technique pipeline and Trainer
construction as training (modeling.apply_techniques, training.build_trainer): attention, 4-bit base,
LoRA/BitFit/freezing, autocast, compile, optimizer and checkpointing are applied once, in one place.
"""
from __future__ import annotations

import tempfile

import torch

from hpml import modeling, tracking
from hpml.config import ProbeConfig, TrainConfig
from hpml.errors import UsageError
from hpml.metrics.memory import mib
from hpml.tasks import Prepared, get_task
from hpml.variants import Variant, get_variant

__all__ = ["ProbeConfig", "run_probe", "resolve", "optimizer_state_bytes"]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer) -> int:
    """Moments (and 8-bit quantization maps) as really allocated: the tensors inside optimizer.state."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real one
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def synthetic_features(spec, n: int, seq_len: int, vocab: int):
    """`n` full-length rows of random tokens with labels of the task's kind (a fixed seed: every probe of a
    shape sees the same batch)."""
    import datasets

    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": torch.randint(1000, vocab, (n, seq_len), generator=g).tolist(),
            "attention_mask": [[1] * seq_len] * n, "token_type_ids": [[0] * seq_len] * n, "length": [seq_len] * n}
    if spec.num_labels:
        rows["labels"] = torch.randint(0, spec.num_labels, (n,), generator=g).tolist()
    else:
        rows["start_positions"] = torch.randint(0, seq_len, (n,), generator=g).tolist()
        rows["end_positions"] = torch.randint(0, seq_len, (n,), generator=g).tolist()
    return datasets.Dataset.from_dict(rows)


def resolve(cfg: ProbeConfig) -> tuple[Variant, str, int]:
    variant = get_variant(cfg.variant)
    task = cfg.task or variant.task
    if task != variant.task:
        raise UsageError(f"variant {variant.id} belongs to task {variant.task}, not {task}")
    if cfg.precision not in ("fp16", "bf16"):
        raise UsageError(f"precision must be fp16 or bf16, got {cfg.precision!r}")
    if not torch.cuda.is_available():
        raise UsageError("vram_probe measures CUDA memory and needs a GPU: run it on a GPU machine "
                         "(this one has no CUDA device)")
    max_length = next(p.default for p in get_task(task).params if p.name == "max_length")
    return variant, task, cfg.seq_len or max_length


def run_probe(cfg: ProbeConfig) -> dict[str, float]:
    variant, task, seq_len = resolve(cfg)
    tracking.connect()
    precision = modeling.resolve_precision(variant, "cuda") if variant.precision.quantization else cfg.precision
    tags = {tracking.TAG_VARIANT: variant.id, tracking.TAG_PURPOSE: cfg.purpose, tracking.TAG_PRECISION: precision,
            "probed_task": task}
    resolved = {f"resolved.{k}": v for k, v in vars(cfg).items()} | {"resolved.seq_len": seq_len,
                                                                      "resolved.task": task}
    with tempfile.TemporaryDirectory(prefix="hpml-probe-") as work, \
            tracking.run("vram", variant.id, cfg.experiment, tags, dict(vars(cfg)), resolved | variant.to_params()):
        metrics = measure(variant, task, cfg, seq_len, work)
        tracking.log_metrics(metrics)
    return metrics


def measure(variant: Variant, task: str, cfg: ProbeConfig, seq_len: int, work: str,
            device: str = "cuda") -> dict[str, float]:
    """Two Trainer steps: the first warms up (optimizer state, compiled graphs, allocator), then peaks are
    reset and the second, optimizer step included, is measured. (`device`: tests run the steps on a CPU.)"""
    from transformers import TrainerCallback

    from hpml.training import build_trainer

    spec = get_task(task)
    built = modeling.apply_techniques(variant, spec, cfg.model, work, seed=0, device=device, precision=cfg.precision)
    features = synthetic_features(spec, 2 * cfg.batch_size, seq_len, built.model.config.vocab_size)
    run_cfg = TrainConfig(task=task, variant=variant.id, model=cfg.model, batch_size=cfg.batch_size,
                          max_length=seq_len, max_steps=2, seed=0)
    seen: dict[str, float] = {}

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if state.global_step == 1:  # gradients as allocated, just before the optimizer consumes them
                seen["grads"] = tensor_bytes(p.grad for p in built.model.parameters() if p.grad is not None)

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            if state.global_step == 2:
                torch.cuda.synchronize()
                seen["peak"] = torch.cuda.max_memory_allocated()
                seen["reserved"] = torch.cuda.max_memory_reserved()
                seen["optimizer"] = optimizer_state_bytes(optimizer)

    trainer = build_trainer(spec, variant, run_cfg, built, Prepared(features, None, None, ""), work, device,
                            callbacks=[Meter()])
    trainer.train()
    model = built.model
    params = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    return {
        tracking.M_PROBE_ALLOC: mib(seen["peak"]),
        tracking.M_PROBE_RESERVED: mib(seen["reserved"]),
        tracking.M_DEVICE_TOTAL: mib(torch.cuda.get_device_properties(0).total_memory),
        tracking.M_MEM_PARAMS: mib(params),
        tracking.M_MEM_GRADS: mib(seen["grads"]),
        tracking.M_MEM_OPTIMIZER: mib(seen["optimizer"]),
        # The rest of the peak: activations saved for backward, autocast copies, workspace.
        tracking.M_MEM_ACTIVATIONS: max(0.0, mib(seen["peak"] - params - seen["grads"] - seen["optimizer"])),
        **built.counts.as_metrics(),
    }
