"""vram_probe: the study's training-step VRAM method, plus where the memory goes (params/grads/optimizer/rest)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from hpml import modeling, tracking
from hpml.errors import UsageError
from hpml.metrics.memory import mib
from hpml.variants import Variant, get_variant

DEFAULT_SEQ = {"squad": 384, "sst2": 128}


@dataclass
class ProbeConfig:
    variant: str
    task: str = ""
    batch_size: int = 8
    seq_len: int = 0
    precision: str = "fp16"
    model: str = "bert-base-uncased"
    experiment: str = "hpml-vram"
    purpose: str = "real"


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer) -> int:
    """Moments (and 8-bit quantization maps) as really allocated: the tensors inside optimizer.state."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def make_optimizer(variant: Variant, params, lr: float):
    if variant.optimizer.name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=variant.optimizer.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=variant.optimizer.weight_decay)


def synthetic_batch(task: str, batch_size: int, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, vocab, (batch_size, seq_len), generator=g),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
             "token_type_ids": torch.zeros(batch_size, seq_len, dtype=torch.long)}
    if task == "squad":
        batch["start_positions"] = torch.randint(0, seq_len, (batch_size,), generator=g)
        batch["end_positions"] = torch.randint(0, seq_len, (batch_size,), generator=g)
    else:
        batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
    return {k: v.cuda() for k, v in batch.items()}


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
    return variant, task, cfg.seq_len or DEFAULT_SEQ[task]


def run_probe(cfg: ProbeConfig) -> dict[str, float]:
    variant, task, seq_len = resolve(cfg)
    tracking.connect()
    tags = {tracking.TAG_VARIANT: variant.id, tracking.TAG_PURPOSE: cfg.purpose, tracking.TAG_PRECISION: cfg.precision,
            "probed_task": task}
    resolved = {f"resolved.{k}": v for k, v in vars(cfg).items()} | {"resolved.seq_len": seq_len,
                                                                      "resolved.task": task}
    with tempfile.TemporaryDirectory(prefix="hpml-probe-") as work, \
            tracking.run("vram", variant.id, cfg.experiment, tags, dict(vars(cfg)), resolved | variant.to_params()):
        metrics = measure(variant, task, cfg, seq_len, work)
        tracking.log_metrics(metrics)
    return metrics


def measure(variant: Variant, task: str, cfg: ProbeConfig, seq_len: int, work: str) -> dict[str, float]:
    """One warm-up step (not measured), reset peaks, one measured step, optimizer step included."""
    built = modeling.build_model(variant, cfg.model, task, work, seed=0)
    model = built.model
    if not variant.precision.quantization:
        model.cuda()
    if variant.memory.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    step_model = torch.compile(model, backend=variant.compile.backend) if variant.compile.enabled else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(variant, trainable, variant.optimizer.lr)
    dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and not variant.precision.quantization)
    batch = synthetic_batch(task, cfg.batch_size, seq_len, model.config.vocab_size)

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype):
            loss = step_model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates optimizer state, compiles, fills the caching allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = mib(torch.cuda.max_memory_allocated())
    params = mib(tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()))
    grads = mib(tensor_bytes(trainable))  # each trainable parameter holds a same-sized gradient at the peak
    opt_state = mib(optimizer_state_bytes(optimizer))
    return {
        tracking.M_PROBE_ALLOC: peak,
        tracking.M_PROBE_RESERVED: mib(torch.cuda.max_memory_reserved()),
        tracking.M_DEVICE_TOTAL: mib(torch.cuda.get_device_properties(0).total_memory),
        tracking.M_MEM_PARAMS: params,
        tracking.M_MEM_GRADS: grads,
        tracking.M_MEM_OPTIMIZER: opt_state,
        tracking.M_MEM_ACTIVATIONS: max(0.0, peak - params - grads - opt_state),
        **built.counts.as_metrics(),
    }
