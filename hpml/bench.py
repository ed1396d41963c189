"""`hpml bench`: training and eval speed of the study's Trainer recipe and of hpml variants, side by side.

One process, one set of generated SQuAD-shaped features, one random initialisation. Row 1 is the study's
recipe as users run it (HF Trainer, eager attention, fp16 AMP on CUDA, every feature padded to max_length,
batch 32, AdamW); then each chosen variant's technique in a lean loop: batches collated before the clock
starts (in pinned memory), fused AdamW, gradient clipping as the Trainer does, and no host sync inside the
timed steps. Only torch and transformers are needed (peft for LoRA variants); MLflow logging is optional.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch

from hpml import modeling, packing
from hpml.errors import UsageError
from hpml.variants import Variant, get_variant

# bf16 dense peak of an H100 SXM (datasheet); MFU is reported only where the peak is known.
PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0}
REFERENCE = "reference"


@dataclass
class BenchConfig:
    model: str = "random:bert-base"
    variants: str = "a1,a2,a3,a4-nb,a4-b,b3,p1"
    max_tokens: str = "6000,16384"  # token budgets of packed variants: one row per budget
    steps: int = 60  # timed steps per row
    warmup_steps: int = 15  # untimed first steps (compile, allocator, cuDNN); compile warm-up = their excess
    batch_size: int = 32
    max_length: int = 384
    features: int = 4096  # generated training features, cycled
    eval_features: int = 2048
    eval_batch_size: int = 64  # padded rows; packed eval uses eval_max_tokens
    eval_max_tokens: int = 32768
    seed: int = 0
    profile_steps: int = 0  # >0: torch.profiler over that many steady steps per row (GPU busy share)
    cudagraphs: bool = False  # compiled padded variants also run as <id>+cg with mode reduce-overhead
    static_widths: bool = False  # compiled pad-to-longest variants also run as <id>+sw, one graph per width
    out: str = ""  # folder for results.json and profiles; empty = none
    log: bool = True
    experiment: str = "hpml-bench"
    purpose: str = "real"


@dataclass
class Row:
    label: str
    variant: str
    knobs: str
    features_per_s: float = 0.0
    tokens_per_s: float = 0.0  # real (non-pad) tokens
    padded_share: float = 0.0  # share of the step's tokens that are padding
    mfu_pct: float = float("nan")
    warmup_s: float = 0.0  # warm-up steps' time beyond the steady step time (compilation, mostly)
    recompiles: int = 0  # graphs compiled during the timed steps
    graphs: int = 0  # graphs compiled in all
    peak_vram_mib: float = 0.0
    eval_features_per_s: float = 0.0
    gpu_busy_pct: float = float("nan")  # kernel time / wall time over profiled steps
    ratio: float = 0.0  # features/s over the reference's
    extra: dict = field(default_factory=dict)


# ---- data -----------------------------------------------------------------------------------------------
def squad_shaped_features(n: int, max_length: int, seed: int, vocab: int = modeling.BERT_VOCAB_SIZE) -> list[dict]:
    """Features shaped like SQuAD v2 windows at `max_length`: 12% full windows (long contexts), the rest
    question + context with length ~ N(0.43, 0.14) x max_length (mean ~0.48 x max_length: ~185 of 384,
    so 32 features hold ~5,900 real tokens); labels inside the feature, a third at CLS (no answer)."""
    rng = np.random.default_rng(seed)
    full = rng.random(n) < 0.12
    lengths = np.where(full, max_length,
                       np.clip(rng.normal(0.43, 0.14, n) * max_length, max(8, max_length // 10), max_length - 1))
    feats = []
    for n_tok in lengths.astype(int):
        ids = rng.integers(1000, vocab, n_tok)
        q = min(n_tok // 4, 24)
        ids[0], ids[q], ids[-1] = 101, 102, 102  # [CLS] question [SEP] context [SEP]
        types = np.zeros(n_tok, dtype=np.int64)
        types[q + 1:] = 1
        if rng.random() < 1 / 3 or n_tok - 2 <= q + 1:
            s = e = 0
        else:
            s = int(rng.integers(q + 1, n_tok - 1))
            e = int(min(n_tok - 2, s + rng.integers(0, 8)))
        feats.append({"input_ids": ids, "token_type_ids": types, "start_positions": s, "end_positions": e})
    return feats


def padded(rows: list[dict], width: int, pad_id: int = 0, labels: bool = True) -> dict[str, torch.Tensor]:
    n = len(rows)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k], types[i, :k], mask[i, :k] = r["input_ids"], r["token_type_ids"], 1
    out = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    if labels:
        out["start_positions"] = np.array([r["start_positions"] for r in rows])
        out["end_positions"] = np.array([r["end_positions"] for r in rows])
    return {k: torch.from_numpy(v) for k, v in out.items()}


def batch_indices(v: Variant, lengths: np.ndarray, cfg: BenchConfig, budget: int, seed: int) -> list[list[int]]:
    """The variant's batches over one epoch: random batches, length-grouped ones, or token-budget packs."""
    if v.batching.padding == "packed":
        return list(iter(packing.TokenBudgetBatchSampler(lengths, budget, seed=seed)))
    if v.batching.group_by_length:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(seed)
        order = get_length_grouped_indices(lengths.tolist(), cfg.batch_size, generator=g)
    else:
        order = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    return [order[i:i + cfg.batch_size] for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size)]


def width_for(v: Variant, longest: int, max_length: int) -> int:
    if v.batching.padding == "max_length":
        return max_length
    m = v.batching.pad_to_multiple_of
    return min(max_length, -(-longest // m) * m)


def make_batches(v: Variant, feats: list[dict], cfg: BenchConfig, budget: int, n: int, train: bool = True):
    """`n` collated batches (cycling epochs), in pinned memory on CUDA; each with its real feature/token count."""
    lengths = np.array([len(f["input_ids"]) for f in feats])
    out, epoch = [], 0
    col = (packing.PackedCollator(0, budget, cfg.max_length, packing.max_segments(lengths, budget, cfg.max_length))
           if v.batching.padding == "packed" else None)
    while len(out) < n:
        idx_lists = (batch_indices(v, lengths, cfg, budget, cfg.seed + epoch) if train else
                     (packing.pack_indices(lengths, budget) if col else
                      [list(range(i, min(i + cfg.eval_batch_size, len(feats))))
                       for i in range(0, len(feats), cfg.eval_batch_size)]))
        for idx in idx_lists:
            rows = [feats[i] for i in idx]
            if col is not None:
                b = col(rows if train else [{k: r[k] for k in ("input_ids", "token_type_ids")} for r in rows])
                width = budget
            else:
                width = width_for(v, int(lengths[idx].max()), cfg.max_length)
                b = padded(rows, width, labels=train)
            if torch.cuda.is_available():
                b = {k: (t.pin_memory() if torch.is_tensor(t) else t) for k, t in b.items()}
            real = lengths[idx]
            out.append((b, len(idx), int(real.sum()), len(idx) * width if col is None else width,
                        float((real.astype(np.float64) ** 2).sum())))
            if len(out) == n:
                break
        epoch += 1
        if not train:
            break
    return out


# ---- model ---------------------------------------------------------------------------------------------------
def base_config(model_ref: str):
    ref = modeling.resolve_model_ref(model_ref)
    if ref.startswith("random:"):
        return modeling.random_config(ref.split(":", 1)[1], "squad"), None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ref), ref


def build(v: Optional[Variant], config, init_state: dict, device: str, attn: str):
    cls = modeling.model_class("squad")
    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = attn
    model = cls.from_config(config, attn_implementation=attn)
    model.load_state_dict(init_state)
    if v is not None:
        mode = v.trainable.mode
        if mode == "lora":
            model = modeling.apply_lora(model, v, "squad")
        elif mode == "bias":
            model = modeling.apply_bias_only(model, "squad")
        elif mode == "freeze_lower":
            model = modeling.apply_freeze_lower(model, v.trainable.freeze_fraction)
        if v.memory.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    return model.to(device)


def flops_per_step(n_matmul_params: int, tokens: int, sq_len_sum: float, layers: int, hidden: int) -> float:
    """Training FLOPs of the real tokens: 6 per matmul parameter per token, plus attention scores and
    weighted sums (2 x 2 x n^2 x hidden per layer forward, x3 with backward) over each feature's own length."""
    return 6.0 * n_matmul_params * tokens + 12.0 * layers * hidden * sq_len_sum


def matmul_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embeddings" not in n)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _profile_busy(device: str, run_steps: Callable[[int], None], n: int, out_file: str, label: str) -> float:
    """Share of wall time the GPU spends in kernels over n steady steps; the top kernels go to out_file."""
    if device != "cuda" or n <= 0:
        return float("nan")
    handle = _start_profiler(device)
    run_steps(n)
    return _stop_profiler(handle, device, n, out_file, label)


# ---- rows ---------------------------------------------------------------------------------------------------
def run_reference(cfg: BenchConfig, config, init_state, feats, eval_feats, device: str, peak: float) -> Row:
    """The study's recipe through the HF Trainer: eager attention, fp16 AMP, padded to max_length, AdamW."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    row = Row(REFERENCE, REFERENCE, "HF Trainer, eager, fp16 AMP, padded, adamw_torch")
    _free(device)
    model = build(None, config, init_state, device, "eager")
    pad = lambda r: {k: v.tolist() for k, v in padded([r], cfg.max_length).items()}  # noqa: E731
    data = [{k: v[0] for k, v in pad(f).items()} for f in feats]
    total = cfg.warmup_steps + cfg.steps + cfg.profile_steps
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (1, cfg.warmup_steps, cfg.warmup_steps + cfg.steps):
                _sync(device)
                marks[state.global_step] = time.perf_counter()
            if cfg.profile_steps and state.global_step == cfg.warmup_steps + cfg.steps:
                marks["prof"] = _start_profiler(device)

        def on_train_end(self, args, state, control, **kw):
            if "prof" in marks:
                marks["busy"] = _stop_profiler(marks.pop("prof"), device, cfg.profile_steps,
                                               os.path.join(cfg.out, "profiles.txt") if cfg.out else "", REFERENCE)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.batch_size, max_steps=total,
                                 learning_rate=3e-5, optim="adamw_torch", fp16=device == "cuda",
                                 report_to="none", save_strategy="no", logging_steps=500, seed=cfg.seed,
                                 use_cpu=device != "cuda", dataloader_num_workers=0,
                                 per_device_eval_batch_size=cfg.eval_batch_size)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                          callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
        t_first = marks[1] - start
        steady = (marks[cfg.warmup_steps + cfg.steps] - marks[cfg.warmup_steps]) / cfg.steps
        eval_data = [{k: v[0] for k, v in pad(f).items() if k in ("input_ids", "token_type_ids", "attention_mask")}
                     for f in eval_feats]
        trainer.predict(eval_data[:cfg.eval_batch_size])  # warm-up batch
        _sync(device)
        t0 = time.perf_counter()
        trainer.predict(eval_data)
        _sync(device)
        eval_s = time.perf_counter() - t0
    lengths = np.array([len(f["input_ids"]) for f in feats])
    per_step_tokens = lengths.mean() * cfg.batch_size
    row.features_per_s = cfg.batch_size / steady
    row.tokens_per_s = per_step_tokens / steady
    row.padded_share = 1 - lengths.mean() / cfg.max_length
    fl = flops_per_step(matmul_params(model), per_step_tokens, (lengths.astype(float) ** 2).mean() * cfg.batch_size,
                        config.num_hidden_layers, config.hidden_size)
    row.mfu_pct = 100 * fl / steady / (peak * 1e12) if peak else float("nan")
    row.warmup_s = max(0.0, t_first - steady)
    row.eval_features_per_s = len(eval_data) / eval_s
    row.peak_vram_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    row.gpu_busy_pct = marks.get("busy", float("nan"))
    del trainer, model
    return row


def _start_profiler(device):
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    prof.start()
    _sync(device)
    return (prof, time.perf_counter())


def _stop_profiler(handle, device, n, out_file, label="") -> float:
    prof, t0 = handle
    _sync(device)
    wall = time.perf_counter() - t0
    prof.stop()
    from torch.autograd import DeviceType

    events = prof.key_averages()
    # time inside kernels and copies on the device (the CPU-side op rows repeat it, so they are left out)
    kernel_us = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
    if out_file:
        with open(out_file, "a") as f:  # one file for every row: the device tool returns few files
            f.write(f"\n==== {label}: wall {wall * 1e3:.1f} ms over {n} steps; device busy {kernel_us / 1e3:.1f} ms\n")
            f.write(events.table(sort_by="self_device_time_total", row_limit=30))
            f.write("\n")
            f.write(events.table(sort_by="self_cpu_time_total", row_limit=20))
    return 100.0 * kernel_us / 1e6 / wall


CG = "+cg"  # label suffix of a row compiled with CUDA graphs by --cudagraphs
SW = "+sw"  # label suffix of a row by --static-widths: torch.compile's default, a graph per padded width


def with_cudagraphs(v: Variant) -> Variant:
    """The variant compiled in mode reduce-overhead (CUDA graphs): one graph replay per step and shape."""
    return replace(v, compile=replace(v.compile, mode="reduce-overhead"))


def cudagraph_twin(v: Variant) -> bool:
    """Whether --cudagraphs adds a row for v: compiled with inductor, padded, not already in CUDA graphs."""
    return (v.compile.enabled and v.compile.backend == "inductor" and v.compile.mode == "default"
            and v.batching.padding != "packed")


def run_variant(v: Variant, budget: int, cfg: BenchConfig, config, init_state, feats, eval_feats, device: str,
                peak: float, suffix: str = "", static_widths: bool = False) -> Row:
    label = (f"{v.id}@{budget}" if v.batching.padding == "packed" else v.id) + suffix
    row = Row(label, v.id, v.knobs() + (f", {budget} tokens/step" if v.batching.padding == "packed" else "")
              + (", a graph per padded width" if static_widths else ""))
    _free(device)
    torch._dynamo.reset()
    attn = packing.register_attention() if v.batching.padding == "packed" else v.attention.impl
    model = build(v, config, init_state, device, attn)
    fwd = (torch.compile(model, backend=v.compile.backend,
                         mode=None if v.compile.mode == "default" else v.compile.mode)
           if v.compile.enabled else model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=v.optimizer.lr, weight_decay=v.optimizer.weight_decay,
                            fused=device == "cuda")
    total = cfg.warmup_steps + cfg.steps + cfg.profile_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    batches = make_batches(v, feats, cfg, budget, total)
    dtype = torch.bfloat16 if device == "cuda" else None
    packed = v.batching.padding == "packed"
    loss_fn = packing.qa_loss_function(v.compile.backend if v.compile.enabled else None) if packed else None
    dynamic = modeling.dynamic_widths(v) and not static_widths  # as hpml's training marks them

    def step(b):
        b = {k: (t.to(device, non_blocking=True) if torch.is_tensor(t) else t) for k, t in b.items()}
        if dynamic:
            modeling.mark_dynamic(b)
        with (torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()):
            if packed:
                out = fwd(**packing.model_inputs(b))
                loss = packing.packed_qa_loss(out.start_logits, out.end_logits, b, loss_fn)
            else:
                loss = fwd(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=device == "cuda")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    it = iter(batches)
    start = time.perf_counter()
    if v.compile.enabled and v.batching.padding == "longest":
        # one step of each padded width first: a compiled model meets every shape during warm-up, not
        # inside the timed steps (at most max_length / pad_to_multiple_of widths): a +sw row compiles a graph
        # per width, a +cg row records one, the dynamic graph of the others just runs each once
        seen = {}
        for b in batches:
            seen.setdefault(tuple(b[0]["input_ids"].shape), b[0])
        for b in seen.values():
            step(b)
            if v.compile.mode == "reduce-overhead":
                step(b)  # CUDA graph trees record a shape on its second call
    for _ in range(cfg.warmup_steps):
        step(next(it)[0])
    _sync(device)
    t_warm = time.perf_counter() - start
    g0 = _graphs()
    timed = [next(it) for _ in range(cfg.steps)]
    t0 = time.perf_counter()
    for b in timed:
        step(b[0])
    _sync(device)
    secs = time.perf_counter() - t0
    row.recompiles = _graphs() - g0
    if cfg.profile_steps:
        rest = [next(it)[0] for _ in range(cfg.profile_steps)]
        row.gpu_busy_pct = _profile_busy(device, lambda n: [step(b) for b in rest[:n]], cfg.profile_steps,
                                         os.path.join(cfg.out, "profiles.txt") if cfg.out else "", label)
    n_feats = sum(b[1] for b in timed)
    n_tok = sum(b[2] for b in timed)
    row.features_per_s = n_feats / secs
    row.tokens_per_s = n_tok / secs
    row.padded_share = 1 - n_tok / sum(b[3] for b in timed)
    fl = flops_per_step(matmul_params(model), n_tok, sum(b[4] for b in timed), config.num_hidden_layers,
                        config.hidden_size)
    row.mfu_pct = 100 * fl / secs / (peak * 1e12) if peak else float("nan")
    row.warmup_s = max(0.0, t_warm - cfg.warmup_steps * secs / cfg.steps)
    row.peak_vram_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    row.graphs = _graphs()
    row.eval_features_per_s = eval_speed(v, fwd, model, cfg, eval_feats, device, dtype)
    return row


def eval_speed(v: Variant, fwd, model, cfg: BenchConfig, eval_feats, device, dtype) -> float:
    """Forward-only features/s over the eval features, timed after one warm-up batch (postprocessing apart)."""
    budget = cfg.eval_max_tokens
    ev = make_batches(v, eval_feats, cfg, budget, 10**9, train=False)
    model.eval()
    packed = v.batching.padding == "packed"
    with torch.inference_mode(), (torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()):
        def fwd_one(b):
            b = {k: (t.to(device, non_blocking=True) if torch.is_tensor(t) else t) for k, t in b.items()}
            return fwd(**(packing.model_inputs(b) if packed else b)).start_logits

        fwd_one(ev[0][0])
        if len(ev) > 1:
            fwd_one(ev[-1][0])  # a last, partial batch may have a shape of its own: warm it too
        _sync(device)
        t0 = time.perf_counter()
        for b in ev:
            fwd_one(b[0])
        _sync(device)
        secs = time.perf_counter() - t0
    model.train()
    return sum(b[1] for b in ev) / secs


# ---- the command ----------------------------------------------------------------------------------------------
def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"max_tokens must be comma-separated integers, e.g. 6000,16384; got {text!r}") from None
    if not budgets or min(budgets) <= 0:
        raise UsageError(f"max_tokens needs at least one positive token budget, got {text!r}")
    return budgets


def resolve_variants(text: str, device: str) -> list[Variant]:
    vs = [get_variant(x, "squad") for x in str(text).split(",") if x.strip()]
    if not vs:
        raise UsageError("variants is empty: name squad variants, e.g. a2,a3,p1 (hpml variants --task squad)")
    cuda_only = [v.id for v in vs if v.requires_cuda]
    if cuda_only and device != "cuda":
        raise UsageError(f"variants {', '.join(cuda_only)} need a CUDA GPU: drop them or run on a GPU machine")
    return vs


def run_bench(cfg: BenchConfig, echo: Callable[[str], None] = print) -> list[Row]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = resolve_variants(cfg.variants, device)
    budgets = parse_budgets(cfg.max_tokens)
    if min(budgets) < cfg.max_length:
        raise UsageError(f"max_tokens {min(budgets)} is below max_length {cfg.max_length}: a full window must fit")
    if cfg.steps < 1 or cfg.warmup_steps < 1:
        raise UsageError("steps and warmup_steps must be at least 1")
    config, ref = base_config(cfg.model)
    if cfg.log:
        from hpml import tracking

        tracking.connect()
    torch.manual_seed(cfg.seed)
    cls = modeling.model_class("squad")
    init = cls.from_pretrained(ref, dtype=torch.float32) if ref else cls.from_config(config)
    init_state = {k: v.detach().clone() for k, v in init.state_dict().items()}
    del init
    feats = squad_shaped_features(cfg.features, cfg.max_length, cfg.seed, config.vocab_size)
    eval_feats = squad_shaped_features(cfg.eval_features, cfg.max_length, cfg.seed + 1, config.vocab_size)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = PEAK_TFLOPS.get(name, 0.0)
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
    rows = [run_reference(cfg, config, init_state, feats, eval_feats, device, peak)]
    echo(format_rows(rows))
    for v in variants:
        for budget in (budgets if v.batching.padding == "packed" else [0]):
            rows.append(run_variant(v, budget, cfg, config, init_state, feats, eval_feats, device, peak))
            echo(format_rows(rows[-1:], header=False))
        if cfg.cudagraphs and cudagraph_twin(v):
            rows.append(run_variant(with_cudagraphs(v), 0, cfg, config, init_state, feats, eval_feats, device, peak,
                                    suffix=CG))
            echo(format_rows(rows[-1:], header=False))
        if cfg.static_widths and modeling.dynamic_widths(v):
            rows.append(run_variant(v, 0, cfg, config, init_state, feats, eval_feats, device, peak, suffix=SW,
                                    static_widths=True))
            echo(format_rows(rows[-1:], header=False))
    for r in rows:
        r.ratio = r.features_per_s / rows[0].features_per_s
    table = format_rows(rows)
    echo("\n" + table)
    if cfg.out:
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump({"device": name, "config": asdict(cfg), "rows": [asdict(r) for r in rows]}, f, indent=1)
    if cfg.log:
        log_rows(cfg, rows, table, name)
    return rows


COLUMNS = [("label", "row", "{}"), ("features_per_s", "features/s", "{:.0f}"), ("tokens_per_s", "real tokens/s", "{:.0f}"),
           ("padded_share", "pad %", "{:.0%}"), ("mfu_pct", "MFU %", "{:.1f}"), ("warmup_s", "warm-up s", "{:.1f}"),
           ("recompiles", "recompiles", "{}"), ("peak_vram_mib", "peak MiB", "{:.0f}"),
           ("eval_features_per_s", "eval features/s", "{:.0f}"), ("gpu_busy_pct", "GPU busy %", "{:.0f}"),
           ("ratio", "x ref", "{:.2f}")]


def format_rows(rows: list[Row], header: bool = True) -> str:
    def cell(r, key, fmt):
        value = getattr(r, key)
        return "-" if isinstance(value, float) and math.isnan(value) else fmt.format(value)

    lines = []
    if header:
        lines += ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


METRICS = {"features_per_s": "bench_train_features_per_s", "tokens_per_s": "bench_train_real_tokens_per_s",
           "padded_share": "bench_padded_share", "mfu_pct": "bench_mfu_pct", "warmup_s": "bench_warmup_s",
           "recompiles": "bench_recompiles_after_warmup", "peak_vram_mib": "bench_peak_vram_allocated_mib",
           "eval_features_per_s": "bench_eval_features_per_s", "gpu_busy_pct": "bench_gpu_busy_pct",
           "ratio": "bench_ratio_to_reference"}


def log_rows(cfg: BenchConfig, rows: list[Row], table: str, device_name: str) -> None:
    """One parent run (the table as an artifact) and one child run per row, all tagged task=bench."""
    from hpml import tracking

    inputs = {k: v for k, v in asdict(cfg).items() if k not in ("log",)}
    with tracking.run("bench", "bench", cfg.experiment, {tracking.TAG_PURPOSE: cfg.purpose}, inputs,
                      {"resolved.device": device_name}):
        tracking.log_text(table, "bench.md")
        for r in rows:
            tags = {tracking.TAG_VARIANT: r.variant, tracking.TAG_PURPOSE: cfg.purpose, "bench_row": r.label,
                    "bench_knobs": r.knobs}
            with tracking.child_run("bench", r.label, tags):
                tracking.log_metrics({m: float(getattr(r, k)) for k, m in METRICS.items()
                                      if not math.isnan(float(getattr(r, k)))})
