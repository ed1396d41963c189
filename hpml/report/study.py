"""The two source studies' published numbers, as data the report prints beside hpml's own measurements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Both studies ran on one NVIDIA T4 (16 GB; 14915.7 MiB visible to torch). Every number below was measured
# there, so it is comparable to ours only as a ratio between variants, never as an absolute time.
STUDY_DEVICE = "T4"
STUDY_DEVICE_LONG = "NVIDIA T4"
STUDY_DEVICES = {"squad": STUDY_DEVICE, "sst2": STUDY_DEVICE, "vram": STUDY_DEVICE}


@dataclass(frozen=True)
class SquadResult:
    """One row of study 1's results table (SQuAD v2 dev set; EM/F1 in percent)."""

    em: float
    f1: float
    eval_s: float
    eval_samples_per_s: float
    train_loss: float
    train_s: float
    train_samples_per_s: Optional[float]  # the study printed "—" for the C series


@dataclass(frozen=True)
class VramResult:
    """One row of study 1's Table 5: one probed training step at batch 8, fp16."""

    peak_allocated_mib: float
    peak_reserved_mib: float
    device_total_mib: float


@dataclass(frozen=True)
class Sst2Result:
    """One row of study 2 (SST-2 validation, 872 sentences); the study labelled its memory columns MB."""

    label: str
    trainable_params: int
    total_params: int  # QLoRA counted against the fp32 architecture's total, as the study did
    train_min: float
    peak_train_vram_mb: float  # at the training batch, 16, not with the VRAM probe
    val_accuracy: float  # fraction 0–1, after the last epoch
    latency_ms_per_sample: float  # eval loop at batch 32
    vram_after_load_mb: float
    peak_eval_vram_mb: float
    epoch_accuracy: tuple[float, ...]  # validation accuracy after each of the 2 epochs

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params


# Study 1, keyed by hpml's lower-case variant ID.
SQUAD_RESULTS: dict[str, SquadResult] = {
    "a1": SquadResult(73.21, 76.62, 66.97, 181.19, 0.796, 9001.32, 43.91),
    "a2": SquadResult(73.26, 76.56, 70.90, 171.15, 0.793, 9411.91, 42.00),
    "a3": SquadResult(73.37, 76.89, 72.92, 166.41, 0.793, 8729.56, 45.28),
    "a4-nb": SquadResult(73.78, 77.23, 44.66, 271.70, 0.789, 7662.12, 51.59),
    "a4-b": SquadResult(25.82, 26.87, 39.89, 304.21, 0.794, 5769.40, 68.51),  # the failed ablation
    "d1": SquadResult(73.04, 76.35, 69.34, 174.99, 0.793, 8677.81, 45.55),
    "b1": SquadResult(51.12, 54.95, 81.16, 149.50, 1.94, 5613.03, 70.42),
    "b2": SquadResult(54.61, 58.00, 71.64, 169.37, 1.86, 5409.28, 73.07),
    "b3": SquadResult(68.21, 71.99, 71.60, 169.46, 1.05, 4403.16, 89.77),
    "c1": SquadResult(72.64, 76.27, 75.06, 161.65, 0.81, 8509.86, None),
    "c2-8": SquadResult(72.67, 76.14, 72.91, 166.43, 0.81, 9116.26, None),
    "c2": SquadResult(70.85, 74.53, 74.88, 162.05, 0.82, 10645.29, None),
}

# Study 1, Table 5: only these three configurations were probed.
VRAM_RESULTS: dict[str, VramResult] = {
    "a3": VramResult(3087.0, 3256.0, 14915.7),
    "c1": VramResult(2465.9, 2720.0, 14915.7),
    "c2": VramResult(2100.2, 2344.0, 14915.7),
}
VRAM_PROBE_METHOD = ("batch size 8, fp16, one unmeasured warm-up training step, then one measured step "
                     "including the optimizer step; torch.cuda.max_memory_allocated / max_memory_reserved")

# Study 2: 20,000 training rows, 2 epochs, max length 128, train batch 16, eval batch 32, seed 42.
SST2_RESULTS: dict[str, Sst2Result] = {
    "fp32": Sst2Result("BERT FP32", 109_483_778, 109_483_778, 14.59, 2526.11, 0.9163, 7.5969, 420.99,
                       1513.67, (0.9025, 0.9163)),
    "qlora": Sst2Result("BERT QLoRA (4-bit, r=16, q/v, fp16)", 591_362, 109_483_778, 7.55, 1638.87, 0.9060,
                        3.2502, 99.00, 1124.68, (0.8933, 0.9060)),
}


@dataclass(frozen=True)
class StudyTable:
    """A study table as a group of variants with the baseline each variant's difference is measured against.
    `hpml series NAME` runs the baseline with the table's variants, so the difference is like for like."""

    name: str  # what `hpml series` takes
    variants: tuple[str, ...]
    baseline: str


# Baselines: A2 for the A series (SDPA without compile: what each A technique adds to), A3 (SDPA + compile,
# full fine-tuning) for the B and C series (B1/B3 and C1/C2 keep compile and change what trains or how
# memory is spent; study 1's Table 5 compares C1/C2 to A3 too), fp32 for SST-2 (study 2's reference).
STUDY_TABLES: dict[str, StudyTable] = {t.name: t for t in (
    StudyTable("squad-a", ("a1", "a2", "a3", "a4-nb", "a4-b", "d1"), "a2"),
    StudyTable("squad-b", ("b1", "b2", "b3"), "a3"),
    StudyTable("squad-c", ("c1", "c2-8", "c2"), "a3"),
    StudyTable("sst2", ("fp32", "bf16", "lora", "qlora"), "fp32"),
)}


def baseline_of(variant_id: str) -> Optional[str]:
    """The baseline of the first study table listing `variant_id` (None for a variant in none)."""
    for table in STUDY_TABLES.values():
        if variant_id in table.variants:
            return table.baseline
    return None
