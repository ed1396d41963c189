"""Report tables: an mlflow.search_runs DataFrame in, the studies' tables (their numbers beside ours) out."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import pandas as pd

from hpml.config import short_model
from hpml.errors import HpmlError, UsageError
from hpml.report import stats, study
from hpml.tracking import (
    M_DEVICE_TOTAL, M_EVAL_MS, M_EVAL_RUNTIME, M_EVAL_SPS, M_EXACT, M_F1, M_FULL_ARCH_PARAMS, M_MEM_ACTIVATIONS,
    M_MEM_GRADS, M_MEM_OPTIMIZER, M_MEM_PARAMS, M_PEAK_EVAL_VRAM, M_PEAK_TRAIN_ALLOC, M_PROBE_ALLOC,
    M_PROBE_RESERVED, M_TOTAL, M_TRAIN_LOSS, M_TRAIN_RUNTIME, M_TRAIN_SPS, M_TRAINABLE, M_VRAM_AFTER_LOAD,
    M_ACCURACY, TAG_DEVICE, TAG_FINGERPRINT, TAG_PURPOSE, TAG_RECIPE, TAG_TASK, TAG_VARIANT,
)
from hpml.variants import CATALOG, Variant, get_variant, variants_for

MISSING = "—"  # every measured cell of a variant without a FINISHED run, and any metric a run did not log
NO_RUN = "no FINISHED run found"
STUDY_SUFFIX = f" (study, {study.STUDY_DEVICE})"
FORMATS = ("md", "csv", "tex")
RUN_TASKS = ("squad", "sst2", "vram", "bench")  # tasks whose runs feed the tables; "report" runs are our own output

_STUDY_NOTE = (f"Columns marked “{STUDY_SUFFIX.strip()}” are the source study's published numbers, measured on "
               f"one {study.STUDY_DEVICE_LONG}; all other numbers were measured by hpml on the device in the "
               "`device` column, so compare ratios between variants, not absolute times.")


class EmptyReportError(HpmlError):
    """The tracking server holds no FINISHED hpml run (after the tag filter), so there is nothing to report."""


@dataclass
class Table:
    """One report table: every cell of `frame` is already a display string."""

    name: str  # file stem, e.g. "table2_a_series"
    title: str
    frame: pd.DataFrame
    footnotes: list[str] = field(default_factory=list)


# ---- selecting runs ----------------------------------------------------------------------------------
def _tag(name: str) -> str:
    return f"tags.{name}"


def finished_runs(df: Optional[pd.DataFrame], tag_filter: Optional[Mapping[str, str]] = None) -> pd.DataFrame:
    """FINISHED runs matching every tag in `tag_filter`, oldest first, every one of them (seed repeats too).

    Failed, killed and still-running runs never enter: a half-finished run's metrics would look like a
    result. Keys of `tag_filter` may be given with or without the `tags.` prefix.
    """
    task_col, variant_col = _tag(TAG_TASK), _tag(TAG_VARIANT)
    if df is None:
        return pd.DataFrame(columns=["run_id", "status", "start_time", task_col, variant_col])
    # search_runs returns a frame without tag columns when no run carries the tag: nothing can match.
    if df.empty or any(c not in df.columns for c in ("status", "start_time", task_col, variant_col)):
        return df.iloc[0:0].copy()
    keep = df["status"].eq("FINISHED") & df[task_col].notna() & df[variant_col].notna()
    for key, value in (tag_filter or {}).items():
        col = key if key.startswith("tags.") else _tag(key)
        keep &= df[col].eq(value) if col in df.columns else False
    runs = df.loc[keep].copy()
    runs[variant_col] = runs[variant_col].astype(str).str.strip().str.lower()
    return runs.sort_values("start_time", kind="stable", na_position="first").reset_index(drop=True)


def select_runs(df: Optional[pd.DataFrame], tag_filter: Optional[Mapping[str, str]] = None) -> pd.DataFrame:
    """finished_runs, then only the newest per (task, variant)."""
    runs = finished_runs(df, tag_filter)
    if runs.empty:
        return runs
    runs = runs.drop_duplicates([_tag(TAG_TASK), _tag(TAG_VARIANT)], keep="last")
    return runs.reset_index(drop=True)


SEED_PARAMS = ("params.resolved.seed", "params.seed")


def seed_runs(runs: pd.DataFrame, task: str) -> dict[str, pd.DataFrame]:
    """variant ID → the runs its statistics are taken over: the newest FINISHED run's recipe (same
    configuration and data, `recipe_hash`), newest run per seed. A run without the tag stands alone."""
    fin = finished_runs(runs)
    out: dict[str, pd.DataFrame] = {}
    for vid, newest in latest_by_variant(runs, task).items():
        recipe = newest.get(_tag(TAG_RECIPE))
        if recipe is None or pd.isna(recipe) or _tag(TAG_RECIPE) not in fin.columns:
            out[vid] = newest.to_frame().T
            continue
        same = fin[fin[_tag(TAG_TASK)].eq(task) & fin[_tag(TAG_VARIANT)].eq(vid) & fin[_tag(TAG_RECIPE)].eq(recipe)]
        seed_col = next((c for c in SEED_PARAMS if c in same.columns), None)
        out[vid] = same.drop_duplicates(seed_col, keep="last") if seed_col else same.tail(1)
    return out


def metric_values(group: Optional[pd.DataFrame], name: str) -> list[float]:
    if group is None or f"metrics.{name}" not in group.columns:
        return []
    return [float(v) for v in group[f"metrics.{name}"] if v is not None and not pd.isna(v)]


def model_of(run: Optional[pd.Series]) -> str:
    for key in ("params.model", "params.resolved.model"):
        value = None if run is None else run.get(key)
        if value is not None and not pd.isna(value) and str(value):
            return short_model(str(value))
    return MISSING


def latest_by_variant(runs: pd.DataFrame, task: str) -> dict[str, pd.Series]:
    """variant ID → its newest FINISHED run of `task` (selection is idempotent, so raw input is safe)."""
    runs = select_runs(runs)
    if runs.empty:
        return {}
    mine = runs[runs[_tag(TAG_TASK)] == task]
    return {row[_tag(TAG_VARIANT)]: row for _, row in mine.iterrows()}


def metric_value(run: Optional[pd.Series], name: str) -> Optional[float]:
    if run is None:
        return None
    value = run.get(f"metrics.{name}")
    return None if value is None or pd.isna(value) else float(value)


def tag_value(run: Optional[pd.Series], name: str) -> str:
    if run is None:
        return MISSING
    value = run.get(_tag(name))
    return MISSING if value is None or pd.isna(value) or str(value) == "" else str(value)


# ---- formatting --------------------------------------------------------------------------------------
def _num(value: Optional[float], decimals: int) -> str:
    return MISSING if value is None else f"{value:.{decimals}f}"


def _pct(value: float) -> str:
    """100 → '100%', 0.5401 → '0.54%': the study's style, no trailing zeros."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def display_id(v: Variant) -> str:
    """SQuAD variants print as the study labelled them (A4-nb); SST-2 ones by hpml ID (its labels are long)."""
    return v.study_id if v.task == "squad" and v.study_id else v.id


def _missing_note(labels: Sequence[str]) -> list[str]:
    if not labels:
        return []
    return [f"{', '.join(labels)}: {NO_RUN}; measured cells show {MISSING}."]


def _provenance_notes(runs: Iterable[Optional[pd.Series]]) -> list[str]:
    """Warn when rows are not like for like, or are small-data runs set beside the study's full-data numbers."""
    present = [r for r in runs if r is not None]
    purposes = sorted({p for p in (tag_value(r, TAG_PURPOSE) for r in present) if p != MISSING})
    prints = {f for f in (tag_value(r, TAG_FINGERPRINT) for r in present) if f != MISSING}
    if len(purposes) > 1 or len(prints) > 1:
        return [f"Rows mix runs of purpose {', '.join(purposes) or MISSING} and {len(prints)} data fingerprints: "
                "not like for like; report one purpose and data fingerprint at a time."]
    if purposes and purposes != ["real"]:
        return [f"Measured rows come from purpose={purposes[0]} runs (small or synthetic data), not full-data "
                "'real' runs: the study's numbers are not comparable to them."]
    return []


# ---- Table 1: configurations -------------------------------------------------------------------------
def table1_configurations() -> Table:
    rows = [{"ID": v.id, "study label": v.study_id or MISSING, "task": v.task, "description": v.description,
             "key knobs": v.knobs(), "requires CUDA": "yes" if v.requires_cuda else "no"} for v in CATALOG]
    added = [v.id for v in CATALOG if not v.study_id]
    notes = [
        "ID is what hpml takes (--variant, tag `variant`); Tables 2–5 print SQuAD IDs as the study wrote them "
        "(A4-nb).",
        "Study 1 labelled B2/B3 loosely (\"LoRA only (BitFit-style)\"); the descriptions here say exactly what "
        "hpml trains.",
        "requires CUDA: bitsandbytes' 8-bit optimizer and 4-bit layers are CUDA kernels.",
    ]
    if added:
        notes.append(f"{', '.join(added)}: hpml additions, in neither study (study label {MISSING}).")
    return Table("table1_configurations", "Table 1: configurations", pd.DataFrame(rows), notes)


# ---- Tables 2–4: SQuAD v2 ----------------------------------------------------------------------------
# (column, metric, decimals, attribute of study.SquadResult printed beside it or None)
_SQUAD_COLUMNS = (
    ("EM", M_EXACT, 2, "em"),
    ("F1", M_F1, 2, "f1"),
    ("T_eval s", M_EVAL_RUNTIME, 2, None),
    ("eval samp/s", M_EVAL_SPS, 2, None),
    ("train loss", M_TRAIN_LOSS, 3, None),
    ("T_train s", M_TRAIN_RUNTIME, 2, None),
    ("train samp/s", M_TRAIN_SPS, 2, None),
)
_SQUAD_NOTE = ("EM and F1 in percent on the SQuAD v2 dev set; samp/s counts features (context windows), "
               "not questions.")
_CI_COLUMNS = {M_F1, M_TRAIN_SPS, M_ACCURACY}  # these get a "±95%" column beside their mean
CI_SUFFIX = " ±95%"
_SEEDS_NOTE = ("Measured numbers are means over the seeds column's runs (the newest run's recipe: same "
               "configuration and data, newest run per seed); ±95% is the half-width of the 95% t-interval of "
               f"the mean, {MISSING} below 2 seeds. Table 7 has std, intervals and differences to each baseline.")


def _mean_cells(row: dict, column: str, metric: str, group: Optional[pd.DataFrame], decimals: int) -> None:
    s = stats.summarize(metric_values(group, metric))
    row[column] = _num(s.mean, decimals)
    if metric in _CI_COLUMNS:
        row[column + CI_SUFFIX] = _num(s.half_width, decimals)


def _squad_table(runs: pd.DataFrame, ids: Sequence[str], name: str, title: str, knobs: bool = False,
                 notes: Sequence[str] = ()) -> Table:
    latest = latest_by_variant(runs, "squad")
    groups = seed_runs(runs, "squad")
    rows, missing, used = [], [], []
    for vid in ids:
        v = get_variant(vid, "squad")
        run = latest.get(vid)
        if run is None:
            missing.append(display_id(v))
        used.append(run)
        row = {"ID": display_id(v)}
        if knobs:
            row["key knobs"] = v.knobs()
        row["model"] = model_of(run)
        row["seeds"] = str(len(groups[vid])) if vid in groups else MISSING
        published = study.SQUAD_RESULTS.get(vid)
        for column, metric, decimals, attr in _SQUAD_COLUMNS:
            _mean_cells(row, column, metric, groups.get(vid), decimals)
            if attr:
                row[column + STUDY_SUFFIX] = _num(getattr(published, attr) if published else None, decimals)
        row["device"] = tag_value(run, TAG_DEVICE)
        rows.append(row)
    footnotes = [_STUDY_NOTE, _SQUAD_NOTE, _SEEDS_NOTE, *notes, *_missing_note(missing), *_provenance_notes(used)]
    return Table(name, title, pd.DataFrame(rows), footnotes)


def table2_a_series(runs: pd.DataFrame) -> Table:
    return _squad_table(
        runs, ("a1", "a2", "a3", "a4-nb", "a4-b", "d1"), "table2_a_series",
        "Table 2: SQuAD v2, A series (attention, compile, batching) and D1",
        notes=("A4-b was the study's failed ablation: length bucketing broke its accuracy (study EM 25.82).",))


def table3_b_series(runs: pd.DataFrame) -> Table:
    return _squad_table(runs, ("b1", "b2", "b3"), "table3_b_series",
                        "Table 3: SQuAD v2, B series (parameter-efficient: LoRA, bias-only, layer freezing)",
                        notes=("What each B variant trains is defined in Table 1.",))


def table4_c_series(runs: pd.DataFrame) -> Table:
    return _squad_table(runs, ("c1", "c2-8", "c2"), "table4_c_series",
                        "Table 4: SQuAD v2, C series (memory: 8-bit AdamW, gradient checkpointing)", knobs=True,
                        notes=("Training-time VRAM of the C series is in Table 5.",))


# ---- Table 5: VRAM probe -----------------------------------------------------------------------------
_BREAKDOWN = (("params MiB", M_MEM_PARAMS), ("grads MiB", M_MEM_GRADS), ("optimizer MiB", M_MEM_OPTIMIZER),
              ("activations MiB", M_MEM_ACTIVATIONS))


def table5_vram(runs: pd.DataFrame) -> Table:
    """One row per probed variant, plus the study's three (A3, C1, C2) even when hpml has not probed them."""
    probes = latest_by_variant(runs, "vram")
    variants = [v for v in CATALOG if v.id in probes or v.id in study.VRAM_RESULTS]
    with_breakdown = any(metric_value(run, metric) is not None for run in probes.values() for _, metric in _BREAKDOWN)
    rows, missing = [], []
    for v in variants:
        run = probes.get(v.id)
        if run is None:
            missing.append(display_id(v))
        published = study.VRAM_RESULTS.get(v.id)
        row = {
            "ID": display_id(v),
            "peak allocated MiB": _num(metric_value(run, M_PROBE_ALLOC), 1),
            "peak allocated MiB" + STUDY_SUFFIX: _num(published.peak_allocated_mib if published else None, 1),
            "peak reserved MiB": _num(metric_value(run, M_PROBE_RESERVED), 1),
            "peak reserved MiB" + STUDY_SUFFIX: _num(published.peak_reserved_mib if published else None, 1),
            "device total MiB": _num(metric_value(run, M_DEVICE_TOTAL), 1),
        }
        if with_breakdown:
            for column, metric in _BREAKDOWN:
                row[column] = _num(metric_value(run, metric), 1)
        row["device"] = tag_value(run, TAG_DEVICE)
        rows.append(row)
    notes = [_STUDY_NOTE,
             f"Study method: {study.VRAM_PROBE_METHOD}; {study.STUDY_DEVICE} total "
             f"{study.VRAM_RESULTS['a3'].device_total_mib:.1f} MiB. hpml's rows come from its VRAM probe runs "
             "(tag task=vram)."]
    if with_breakdown:
        notes.append("params/grads/optimizer/activations: the probe's split of peak allocated memory; "
                     f"{MISSING} where a probe did not log it.")
    notes += _missing_note(missing) + _provenance_notes(probes.values())
    return Table("table5_vram", "Table 5: training-step VRAM (VRAM probe)", pd.DataFrame(rows), notes)


# ---- Table 6: SST-2 ----------------------------------------------------------------------------------
def _params_cells(run: Optional[pd.Series]) -> dict[str, str]:
    """Trainable and total parameters and their ratio, as three plain numbers (the CSV stays numeric)."""
    trainable = metric_value(run, M_TRAINABLE)
    # QLoRA's 4-bit tensors undercount the total, so the full architecture's count is the denominator.
    total = metric_value(run, M_FULL_ARCH_PARAMS) or metric_value(run, M_TOTAL)
    if trainable is None or not total:
        return {"trainable params": MISSING, "total params": MISSING, "trainable %": MISSING}
    return {"trainable params": str(int(trainable)), "total params": str(int(total)),
            "trainable %": _pct(100.0 * trainable / total).rstrip("%")}


def table_sst2(runs: pd.DataFrame) -> Table:
    latest = latest_by_variant(runs, "sst2")
    groups = seed_runs(runs, "sst2")
    rows, missing, used = [], [], []
    variants = variants_for("sst2")
    for v in variants:
        run = latest.get(v.id)
        if run is None:
            missing.append(v.id)
        used.append(run)
        published = study.SST2_RESULTS.get(v.id)
        runtime = stats.summarize(metric_values(groups.get(v.id), M_TRAIN_RUNTIME)).mean
        acc = stats.summarize(metric_values(groups.get(v.id), M_ACCURACY))
        rows.append({
            "ID": v.id,
            "model": model_of(run),
            "seeds": str(len(groups[v.id])) if v.id in groups else MISSING,
            **_params_cells(run),
            "train min": _num(None if runtime is None else runtime / 60.0, 2),
            "peak train VRAM MiB": _num(metric_value(run, M_PEAK_TRAIN_ALLOC), 1),
            "val acc": _num(acc.mean, 4),
            "val acc" + CI_SUFFIX: _num(acc.half_width, 4),
            "val acc" + STUDY_SUFFIX: _num(published.val_accuracy if published else None, 4),
            "val acc per epoch" + STUDY_SUFFIX:
                " → ".join(f"{a:.4f}" for a in published.epoch_accuracy) if published else MISSING,
            "latency ms/sample": _num(metric_value(run, M_EVAL_MS), 4),
            "VRAM after load MiB": _num(metric_value(run, M_VRAM_AFTER_LOAD), 1),
            "peak eval VRAM MiB": _num(metric_value(run, M_PEAK_EVAL_VRAM), 1),
            "device": tag_value(run, TAG_DEVICE),
        })
    unpublished = [v.id for v in variants if v.id not in study.SST2_RESULTS]
    notes = [_STUDY_NOTE, _SEEDS_NOTE,
             "total params: the full fp32 architecture's parameter count for every variant "
             "(4-bit tensors do not sum cleanly), as study 2 counted QLoRA; trainable % of that total.",
             "Memory in MiB (2^20 bytes); study 2 labelled these columns MB. Latency: eval loop, per sentence."]
    if unpublished:
        notes.append(f"{', '.join(unpublished)}: hpml additions; study 2 has no numbers for them.")
    notes += _missing_note(missing) + _provenance_notes(used)
    return Table("table6_sst2", "Table 6: SST-2, full fine-tuning vs (Q)LoRA", pd.DataFrame(rows), notes)


# ---- Table 7: statistics over seeds ------------------------------------------------------------------
# (table label, task, variants, baseline) from the study tables; metrics per task with their decimals.
_STATS_METRICS = {
    "squad": (("EM", M_EXACT, 2), ("F1", M_F1, 2), ("train samp/s", M_TRAIN_SPS, 2), ("eval samp/s", M_EVAL_SPS, 2)),
    "sst2": (("val acc", M_ACCURACY, 4), ("train samp/s", M_TRAIN_SPS, 2), ("latency ms/sample", M_EVAL_MS, 4)),
}
_STATS_TABLES = (("Table 2", "squad", "squad-a"), ("Table 3", "squad", "squad-b"), ("Table 4", "squad", "squad-c"),
                 ("Table 6", "sst2", "sst2"))


def table7_statistics(runs: pd.DataFrame) -> Table:
    """One row per measured variant and metric: seeds, mean, std, 95% interval, and the difference to its
    study table's baseline with Welch's 95% interval and a verdict (within noise where it contains 0)."""
    rows = []
    for label, task, key in _STATS_TABLES:
        spec = study.STUDY_TABLES[key]
        groups = seed_runs(runs, task)
        latest = latest_by_variant(runs, task)
        base = groups.get(spec.baseline)
        if not any(v in groups for v in spec.variants):
            continue
        extra = () if spec.baseline in spec.variants else (spec.baseline,)  # B and C tables: A3 first
        for vid in (*extra, *spec.variants):
            if vid not in groups:
                continue
            v = get_variant(vid, task)
            for name, metric, d in _STATS_METRICS[task]:
                values = metric_values(groups[vid], metric)
                if not values:
                    continue
                s = stats.summarize(values)
                is_base = vid == spec.baseline
                diff = stats.difference(values, metric_values(base, metric)) if not is_base else None
                rows.append({
                    "table": label, "ID": display_id(v), "model": model_of(latest.get(vid)), "metric": name,
                    "seeds": str(s.n), "mean": _num(s.mean, d), "std": _num(s.std, d),
                    "CI95 low": _num(s.ci_low, d), "CI95 high": _num(s.ci_high, d),
                    "baseline": display_id(get_variant(spec.baseline, task)),
                    "diff": _num(diff.diff, d) if diff else MISSING,
                    "diff CI95 low": _num(diff.ci_low, d) if diff else MISSING,
                    "diff CI95 high": _num(diff.ci_high, d) if diff else MISSING,
                    "verdict": "baseline" if is_base else diff.verdict,
                })
    notes = ["Over the runs counted in each table's seeds column. CI95: two-sided 95% t-interval of the mean "
             f"({MISSING} below 2 seeds). diff: variant mean minus baseline mean, with Welch's 95% interval "
             "(unequal variances); 'within noise' where that interval contains 0, 'higher'/'lower' where it "
             "does not.",
             "Baselines: A2 for Table 2, A3 (full fine-tuning with compile) for Tables 3 and 4, fp32 for Table 6; "
             "`hpml series NAME` runs each table's baseline with it."]
    columns = ["table", "ID", "model", "metric", "seeds", "mean", "std", "CI95 low", "CI95 high", "baseline", "diff",
               "diff CI95 low", "diff CI95 high", "verdict"]
    return Table("table7_statistics", "Table 7: statistics over seeds and differences to each table's baseline",
                 pd.DataFrame(rows, columns=columns), notes)


# ---- the whole report --------------------------------------------------------------------------------
def build_report(df: Optional[pd.DataFrame], tag_filter: Optional[Mapping[str, str]] = None, *,
                 tracking_uri: Optional[str] = None) -> list[Table]:
    """All tables in a fixed order; EmptyReportError when no FINISHED hpml run matches."""
    runs = finished_runs(df, tag_filter)  # all of them: the tables pick the newest run and its seed repeats
    if runs.empty or not runs[_tag(TAG_TASK)].isin(RUN_TASKS).any():
        where = tracking_uri or "this tracking URI"
        matching = "".join(f" with {k}={v}" for k, v in (tag_filter or {}).items())
        raise EmptyReportError(
            f"no FINISHED hpml runs found at {where}{matching}; create some first, e.g. `mlflow run . "
            "-e train_squad --experiment-name hpml-squad -P variant=a1 --env-manager local`, then rerun the report")
    tables = [table1_configurations(), table2_a_series(runs), table3_b_series(runs), table4_c_series(runs),
              table5_vram(runs), table_sst2(runs), table7_statistics(runs)]
    speed = table_speed(df, tag_filter)
    return tables + ([speed] if speed is not None else [])


# `hpml bench` rows: (column, metric, decimals); the row label is the run's bench_row tag (p2@6000 …)
SPEED_COLUMNS = (("features/s", "bench_train_features_per_s", 0), ("real tokens/s", "bench_train_real_tokens_per_s", 0),
                 ("MFU %", "bench_mfu_pct", 1), ("warm-up s", "bench_warmup_s", 1),
                 ("recompiles", "bench_recompiles_after_warmup", 0), ("peak MiB", "bench_peak_vram_allocated_mib", 0),
                 ("eval features/s", "bench_eval_features_per_s", 0), ("× reference", "bench_ratio_to_reference", 2))


def table_speed(df: Optional[pd.DataFrame], tag_filter: Optional[Mapping[str, str]] = None) -> Optional[Table]:
    """Speed table from the newest `hpml bench` run's rows (task=bench); None when there is none. Rows of one
    bench run only, since its ratios are measured side by side in that run."""
    row_col, parent_col = _tag("bench_row"), _tag("mlflow.parentRunId")
    if df is None or df.empty or row_col not in df.columns or parent_col not in df.columns:
        return None
    keep = df["status"].eq("FINISHED") & df[_tag(TAG_TASK)].eq("bench") & df[row_col].notna()
    for key, value in (tag_filter or {}).items():
        col = key if key.startswith("tags.") else _tag(key)
        keep &= df[col].eq(value) if col in df.columns else False
    rows = df.loc[keep]
    if rows.empty:
        return None
    newest = rows.sort_values("start_time", kind="stable").iloc[-1][parent_col]
    rows = rows[rows[parent_col] == newest].sort_values("start_time", kind="stable")
    table = [{"row": r[row_col], **{name: _num(metric_value(r, m), d) for name, m, d in SPEED_COLUMNS},
              "device": tag_value(r, TAG_DEVICE)} for _, r in rows.iterrows()]
    notes = ["`hpml bench`: the study's recipe (HF Trainer, eager, fp16 AMP, padded) first, then each variant's "
             "technique in a lean loop, one process, one set of generated features; MFU counts real tokens only."]
    return Table("table8_speed", "Table 8: training and eval speed, side by side (hpml bench)", pd.DataFrame(table),
                 notes)


# ---- renderers ---------------------------------------------------------------------------------------
# Columns of words; every other column holds numbers (or —) and is right-aligned, even when all are —.
_TEXT_COLUMNS = frozenset({"ID", "study label", "task", "description", "key knobs", "requires CUDA", "device",
                           "model", "table", "metric", "baseline", "verdict", "val acc per epoch" + STUDY_SUFFIX,
                           "row"})


def _right_aligned(frame: pd.DataFrame) -> list[bool]:
    return [str(c) not in _TEXT_COLUMNS for c in frame.columns]


def _cells(table: Table) -> tuple[list[str], list[list[str]]]:
    header = [str(c) for c in table.frame.columns]
    body = [[str(c) for c in row] for row in table.frame.itertuples(index=False, name=None)]
    return header, body


def to_markdown(table: Table) -> str:
    """A GitHub pipe table with its title as a heading and footnotes as a list below."""
    def clean(text: str) -> str:
        return text.replace("|", r"\|").replace("\n", " ")

    header, body = _cells(table)
    header = [clean(c) for c in header]
    body = [[clean(c) for c in row] for row in body]
    widths = [max([len(header[i])] + [len(row[i]) for row in body] + [3]) for i in range(len(header))]
    right = _right_aligned(table.frame)

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    out = [f"### {table.title}", "", line(header), rule, *(line(row) for row in body)]
    if table.footnotes:
        out += ["", *(f"- {note}" for note in table.footnotes)]
    return "\n".join(out) + "\n"


def to_csv(table: Table) -> str:
    """The table's cells as CSV, header first; footnotes stay out so the file parses as plain data. A number
    column holds numbers or nothing: its "—" is written empty, so a spreadsheet reads the column as numeric."""
    header, body = _cells(table)
    right = _right_aligned(table.frame)
    body = [["" if r and c == MISSING else c for c, r in zip(row, right)] for row in body]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return buffer.getvalue()


_LATEX = str.maketrans({
    "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
    "—": "---", "–": "--", "→": r"$\rightarrow$", "“": "``", "”": "''",
})


def latex_escape(text: str) -> str:
    return str(text).translate(_LATEX)


def to_latex(table: Table) -> str:
    """A float with a caption, a plain tabular and the footnotes in small print."""
    header, body = _cells(table)
    spec = "".join("r" if r else "l" for r in _right_aligned(table.frame))
    out = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
           rf"\begin{{tabular}}{{{spec}}}", r"\hline",
           " & ".join(latex_escape(c) for c in header) + r" \\", r"\hline"]
    out += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in body]
    out += [r"\hline", r"\end{tabular}"]
    if table.footnotes:
        out.append(r"\par\footnotesize")
        out += [latex_escape(note) + r"\par" for note in table.footnotes]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def _parse_formats(formats: Union[str, Iterable[str]]) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = [f.strip().lower() for f in items if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise UsageError(f"unknown report format(s) {','.join(unknown) or repr(formats)}; choose from "
                         f"{','.join(FORMATS)}")
    return chosen


def _devices(tables: Sequence[Table]) -> list[str]:
    found = set()
    for table in tables:
        if "device" in table.frame.columns:
            found.update(d for d in table.frame["device"].astype(str) if d != MISSING)
    return sorted(found)


def report_markdown(tables: Sequence[Table]) -> str:
    devices = _devices(tables)
    ours = ", ".join(devices) if devices else "the device in each row's `device` column"
    head = ["# hpml report", "",
            f"Study numbers (columns marked “{STUDY_SUFFIX.strip()}”) were measured by the source studies on one "
            f"{study.STUDY_DEVICE_LONG}; hpml's numbers were measured on {ours} (each row's `device` column).", ""]
    return "\n".join(head) + "\n".join(to_markdown(t) for t in tables)


def render_all(tables: Sequence[Table], formats: Union[str, Iterable[str]], out_dir: Union[str, Path]) -> list[Path]:
    """Write report.md (md) and per-table `<name>.csv` / `<name>.tex`; returns the paths written, in order."""
    chosen = _parse_formats(formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "md" in chosen:
        path = out / "report.md"
        path.write_text(report_markdown(tables), encoding="utf-8")
        written.append(path)
    renderers = {"csv": to_csv, "tex": to_latex}
    for table in tables:
        for fmt in ("csv", "tex"):
            if fmt in chosen:
                path = out / f"{table.name}.{fmt}"
                path.write_text(renderers[fmt](table), encoding="utf-8")
                written.append(path)
    return written
