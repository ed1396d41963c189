"""The catalog: every experiment ID hpml runs, as frozen data, indexed once by lower-case ID."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from hpml.errors import UsageError

Task = Literal["squad", "sst2", "mnli"]


# ---- option blocks: each efficiency technique is one small frozen dataclass --------------------------
@dataclass(frozen=True)
class Attention:
    impl: Literal["eager", "sdpa"] = "sdpa"  # eager = the study's "no SDPA" baseline


@dataclass(frozen=True)
class Compile:
    enabled: bool = False
    backend: Literal["inductor", "aot_eager"] = "inductor"
    # "reduce-overhead": inductor replays each step as CUDA graphs, one graph per batch shape: one launch
    # instead of ~1,000 per step, so the host no longer paces the GPU.
    mode: Literal["default", "reduce-overhead"] = "default"


@dataclass(frozen=True)
class Batching:
    # "max_length": every batch padded to max_length (one shape: compile never recompiles).
    # "longest": each batch padded to its longest row, rounded up to `pad_to_multiple_of` so a compiled
    #  model sees at most max_length / pad_to_multiple_of shapes instead of one per batch.
    # "packed": no padding: features laid end to end in one row of exactly `max_tokens` tokens (a token
    #  budget, the run's max_tokens parameter), attention kept within each feature by a varlen kernel.
    padding: Literal["max_length", "longest", "packed"] = "max_length"
    group_by_length: bool = False  # length bucketing: HF's length-grouped sampler, a shuffle not a sort
    pad_to_multiple_of: int = 64


@dataclass(frozen=True)
class Lora:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = ("query", "value")


@dataclass(frozen=True)
class Trainable:
    # "full": every weight; "lora": adapters (+ head); "bias": BitFit, every bias (+ head);
    # "freeze_lower": embeddings and the lower `freeze_fraction` of encoder layers frozen, the rest trains.
    mode: Literal["full", "lora", "bias", "freeze_lower"] = "full"
    lora: Optional[Lora] = None
    freeze_fraction: float = 0.0


@dataclass(frozen=True)
class Precision:
    # "auto" = bf16 where the GPU supports it, else fp16; fp32 on CPU. Logged as the resolved value.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    quantization: Optional[Literal["nf4"]] = None  # 4-bit NF4 base weights with double quantization


@dataclass(frozen=True)
class Optimizer:
    name: Literal["adamw_torch", "adamw_8bit"] = "adamw_torch"
    lr: float = 3e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    scheduler: Literal["linear", "constant"] = "linear"


@dataclass(frozen=True)
class Memory:
    gradient_checkpointing: bool = False
    # Reentrant checkpointing only back-propagates through a segment whose inputs require grad: under
    # frozen lower layers nothing does, and the upper (trainable) layers would silently get no gradient.
    reentrant: bool = False


@dataclass(frozen=True)
class Variant:
    id: str  # lower-case, as stored in tags and registered-model names
    task: Task
    description: str  # one line; Table 1 of the report prints it
    study_id: str = ""  # the label the source study used (A4-nb, C2-8, BERT FP32 …)
    study_run: str = ""  # the study's run directory, for traceability
    attention: Attention = field(default_factory=Attention)
    compile: Compile = field(default_factory=Compile)
    batching: Batching = field(default_factory=Batching)
    trainable: Trainable = field(default_factory=Trainable)
    precision: Precision = field(default_factory=Precision)
    optimizer: Optimizer = field(default_factory=Optimizer)
    memory: Memory = field(default_factory=Memory)

    def __post_init__(self) -> None:
        problems = []
        if self.id != self.id.lower():
            problems.append("ID must be lower-case")
        t = self.trainable
        if (t.mode == "lora") != (t.lora is not None):
            problems.append("LoRA options are given exactly when trainable.mode is 'lora'")
        if t.mode == "freeze_lower" and not 0 < t.freeze_fraction < 1:
            problems.append("freeze_lower needs 0 < freeze_fraction < 1")
        if t.mode != "freeze_lower" and t.freeze_fraction:
            problems.append("freeze_fraction only applies to freeze_lower")
        if self.precision.quantization and t.mode != "lora":
            problems.append("a 4-bit base cannot be fine-tuned directly: quantization needs LoRA adapters")
        if self.precision.quantization and self.precision.dtype in ("auto", "fp32"):
            problems.append("4-bit quantization needs an explicit fp16/bf16 compute dtype")
        if t.mode == "freeze_lower" and self.memory.gradient_checkpointing and self.memory.reentrant:
            problems.append("freeze_lower with reentrant gradient checkpointing trains nothing above the frozen "
                            "layers (their outputs carry no grad); use reentrant=False")
        if self.compile.mode != "default" and (not self.compile.enabled or self.compile.backend != "inductor"):
            # shapes: packed and max_length batches have one; pad-to-longest at most
            # max_length / pad_to_multiple_of, each recorded as a graph of its own
            problems.append("CUDA graphs (mode reduce-overhead) need compile with the inductor backend")
        if self.batching.group_by_length and self.batching.padding != "longest":
            problems.append("length bucketing only helps when batches are padded to their longest row")
        if self.batching.padding == "packed" and (self.task != "squad" or self.attention.impl != "sdpa"):
            problems.append("packed batching is implemented for squad with sdpa attention (varlen when packed)")
        if problems:
            raise ValueError(f"variant {self.id!r}: " + "; ".join(problems))

    @property
    def uses_bitsandbytes(self) -> bool:
        """A 4-bit base or the 8-bit optimizer: the variants that need bitsandbytes."""
        return self.precision.quantization is not None or self.optimizer.name == "adamw_8bit"

    @property
    def requires_cuda(self) -> bool:
        """bitsandbytes' 8-bit optimizer and 4-bit layers are CUDA kernels in hpml's supported setups."""
        return self.uses_bitsandbytes

    def knobs(self) -> str:
        """The 'key knobs' column: the settings that set this variant apart, short."""
        parts = [self.attention.impl]
        if self.compile.enabled:
            parts.append(f"compile[{self.compile.backend}"
                         + (", cudagraphs]" if self.compile.mode == "reduce-overhead" else "]"))
        if self.batching.padding == "longest":
            parts.append("bucketed" if self.batching.group_by_length else "pad-to-longest")
        elif self.batching.padding == "packed":
            parts.append("packed varlen")
        if self.trainable.mode == "lora":
            lo = self.trainable.lora
            parts.append(f"lora r{lo.r}/a{lo.alpha} {'+'.join(lo.targets)}")
        elif self.trainable.mode == "bias":
            parts.append("bias-only")
        elif self.trainable.mode == "freeze_lower":
            parts.append(f"freeze lower {self.trainable.freeze_fraction:.0%}")
        if self.precision.quantization:
            parts.append(f"{self.precision.quantization} 4-bit")
        if self.precision.dtype != "auto":
            parts.append(self.precision.dtype)
        if self.optimizer.name != "adamw_torch":
            parts.append(self.optimizer.name)
        if self.memory.gradient_checkpointing:
            parts.append("grad-ckpt")
        parts.append(f"lr {self.optimizer.lr:g}")
        return ", ".join(parts)

    def to_params(self) -> dict[str, object]:
        """Flat `variant.<block>.<field>` dict for MLflow params."""
        flat: dict[str, object] = {}

        def walk(prefix: str, value: object) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                flat[prefix] = ",".join(value) if isinstance(value, (list, tuple)) else value

        walk("variant", {k: v for k, v in asdict(self).items() if k not in ("id", "task", "description")})
        return flat


# ---- the catalog -------------------------------------------------------------------------------------
# SST-2 sentences average ~25 tokens: padding each batch to its longest row instead of 128 saves most of
# the compute, and no SST-2 variant compiles, so the varying shapes cost nothing.
_SST2_BATCHING = Batching(padding="longest", pad_to_multiple_of=8)
_SDPA_COMPILE = dict(attention=Attention("sdpa"), compile=Compile(True, "inductor"))
_PAD_LONGEST = Batching(padding="longest")
_LORA_QV = Lora(r=16, alpha=32, dropout=0.1, targets=("query", "value"))

CATALOG: tuple[Variant, ...] = (
    # Study 1: bert-base on SQuAD v2. Defaults: lr 3e-5, linear decay, mixed precision by hardware.
    Variant("a1", "squad", "Baseline: eager attention (no SDPA), no compile, batches padded to max_length",
            "A1", "bert-base-squadv2-baseline-t4", attention=Attention("eager")),
    Variant("a2", "squad", "SDPA attention, no compile, batches padded to max_length",
            "A2", "bert-base-squadv2-a2-sdpa-t4"),
    Variant("a3", "squad", "SDPA + torch.compile (inductor), batches padded to max_length",
            "A3", "bert-base-squadv2-a3-sdpa-compile-t4", **_SDPA_COMPILE),
    Variant("a4-nb", "squad",
            "SDPA + compile, random batches padded to their longest row (multiple of 64), no bucketing",
            "A4-nb", "bert-base-squadv2-a4-final-nobucket", batching=_PAD_LONGEST, **_SDPA_COMPILE),
    Variant("a4-b", "squad",
            "SDPA + compile + length bucketing: length-grouped random batches, each padded to its longest "
            "row (multiple of 64); every feature once per epoch with its own labels",
            "A4-b", "bert-base-squadv2-a4-sdpa-compile-bucket-t4-v2",
            batching=Batching(padding="longest", group_by_length=True), **_SDPA_COMPILE),
    Variant("b1", "squad", "LoRA r16/alpha32/dropout 0.1 on query+value, QA head trained, lr 3e-4, compile",
            "B1", "bert-base-squadv2-b1-lora-compile-t4",
            trainable=Trainable("lora", lora=_LORA_QV), optimizer=Optimizer(lr=3e-4), **_SDPA_COMPILE),
    Variant("b2", "squad", "Bias-only (BitFit): every bias + QA head trained, all weights frozen, lr 1e-3, "
            "no compile", "B2", "bert-base-squadv2-b2",
            trainable=Trainable("bias"), optimizer=Optimizer(lr=1e-3)),
    Variant("b3", "squad", "Layer freezing: embeddings + lower half of the encoder frozen, upper half + QA "
            "head trained in full, lr 5e-5, compile", "B3", "bert-base-squadv2-b3",
            trainable=Trainable("freeze_lower", freeze_fraction=0.5), optimizer=Optimizer(lr=5e-5),
            **_SDPA_COMPILE),
    Variant("c1", "squad", "8-bit AdamW (bitsandbytes adamw_8bit) + compile",
            "C1", "bert-base-squadv2-c1-8bit", optimizer=Optimizer("adamw_8bit"), **_SDPA_COMPILE),
    Variant("c2-8", "squad", "8-bit AdamW only: no gradient checkpointing, no compile (VRAM profiling)",
            "C2-8", "bert-base-squadv2-c2-8bit", optimizer=Optimizer("adamw_8bit")),
    Variant("c2", "squad", "32-bit AdamW + gradient checkpointing + compile",
            "C2", "bert-base-squadv2-c2-gc", memory=Memory(gradient_checkpointing=True), **_SDPA_COMPILE),
    Variant("d1", "squad", "torch.compile with backend aot_eager (no inductor codegen), lr 3e-5",
            "D1", "bert-base-squadv2-d1-aot-eager-lr3e-5",
            attention=Attention("sdpa"), compile=Compile(True, "aot_eager"), optimizer=Optimizer(lr=3e-5)),
    # Beyond the study: padding-free token-budget packs (hpml/packing.py). Flash varlen attention on CUDA
    # has no attention-probability dropout: these variants train without it (hidden dropout stays).
    Variant("p0", "squad", "Packed, no padding: features concatenated to a token budget (max_tokens), varlen "
            "attention per feature (no attention-probability dropout), per-feature loss, no compile",
            batching=Batching(padding="packed")),
    Variant("p1", "squad", "Packed, no padding, + torch.compile (inductor): one static shape per step, varlen "
            "attention per feature (no attention-probability dropout), per-feature loss",
            batching=Batching(padding="packed"), **_SDPA_COMPILE),
    Variant("p2", "squad", "p1 + CUDA graphs (torch.compile mode reduce-overhead): packed, no padding, varlen "
            "attention per feature (no attention-probability dropout), per-feature loss",
            batching=Batching(padding="packed"), attention=Attention("sdpa"),
            compile=Compile(True, "inductor", "reduce-overhead")),
    # Study 2: bert-base on SST-2. Full fine-tuning at lr 2e-5; QLoRA per the study's recipe.
    Variant("fp32", "sst2", "Full fine-tuning in fp32 (no mixed precision), lr 2e-5",
            "BERT FP32", batching=_SST2_BATCHING, precision=Precision("fp32"), optimizer=Optimizer(lr=2e-5)),
    Variant("bf16", "sst2", "Full fine-tuning with bf16 autocast (fp32 master weights), lr 2e-5",
            "", batching=_SST2_BATCHING, precision=Precision("bf16"), optimizer=Optimizer(lr=2e-5)),
    Variant("lora", "sst2", "LoRA r16/alpha32/dropout 0.1 on query+value over an fp32 base, classifier "
            "trained, lr 2e-4, weight decay 0.01, warm-up 0.1", "",
            batching=_SST2_BATCHING, trainable=Trainable("lora", lora=_LORA_QV), precision=Precision("fp32"),
            optimizer=Optimizer(lr=2e-4, weight_decay=0.01, warmup_ratio=0.1)),
    Variant("qlora", "sst2", "QLoRA: NF4 4-bit base with double quantization, fp16 compute, LoRA r16/alpha32/"
            "dropout 0.1 on query+value, classifier trained, lr 2e-4, weight decay 0.01, warm-up 0.1",
            "BERT QLoRA (4-bit, r=16, q/v, fp16)",
            trainable=Trainable("lora", lora=_LORA_QV), batching=_SST2_BATCHING,
            precision=Precision("fp16", quantization="nf4"),
            optimizer=Optimizer(lr=2e-4, weight_decay=0.01, warmup_ratio=0.1)),
    # MNLI-format pairs (3 labels): the proof that a task is one spec module plus catalog entries.
    Variant("mnli-full", "mnli", "Full fine-tuning, mixed precision by hardware (fp32 on CPU), lr 2e-5",
            "", batching=_SST2_BATCHING, optimizer=Optimizer(lr=2e-5)),
    Variant("mnli-lora", "mnli", "LoRA r16/alpha32/dropout 0.1 on query+value, classifier trained, lr 2e-4, "
            "weight decay 0.01, warm-up 0.1", "", batching=_SST2_BATCHING,
            trainable=Trainable("lora", lora=_LORA_QV), optimizer=Optimizer(lr=2e-4, weight_decay=0.01,
                                                                               warmup_ratio=0.1)),
)

_BY_ID = {v.id: v for v in CATALOG}
assert len(_BY_ID) == len(CATALOG), "duplicate variant IDs in the catalog"


def variants_for(task: Optional[str] = None) -> list[Variant]:
    return [v for v in CATALOG if task is None or v.task == task]


def get_variant(variant_id: str, task: Optional[str] = None) -> Variant:
    """Case-insensitive look-up; an unknown ID (or one of another task) is a UsageError listing valid IDs."""
    v = _BY_ID.get(variant_id.strip().lower())
    if v is None or (task is not None and v.task != task):
        valid = ", ".join(x.id for x in variants_for(task))
        where = f" for task {task}" if task else ""
        raise UsageError(f"unknown variant {variant_id!r}{where}; valid: {valid}")
    return v
