"""The parameters of each command, declared once: click options and the MLproject test both read this."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional


def cache_dir() -> str:
    """hpml's own cache (tokenized features, random bases): HPML_CACHE_DIR, else ~/.cache/hpml."""
    return os.environ.get("HPML_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hpml")


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # MLproject type: string | float | int (booleans are "true|false" strings)
    default: Any
    help: str


def _common(task: str, *, model_default: str, max_train: int, batch: int, eval_batch: int, max_len: int,
            epochs: float) -> list[Param]:
    return [
        Param("variant", "string", None, f"variant ID from the catalog (hpml variants --task {task})"),
        Param("model", "string", model_default,
              "hub ID, local checkpoint folder, 'minilm' (the installed all-MiniLM-L6-v2) or random:<size>"),
        Param("data_dir", "string", "", "folder with the official-format files; empty = the hub dataset"),
        Param("max_train_samples", "int", max_train, "use the first N training examples (0 = all)"),
        Param("max_eval_samples", "int", 0, "use the first N evaluation examples (0 = all)"),
        Param("epochs", "float", epochs, "training epochs (ignored when max_steps > 0)"),
        Param("max_steps", "int", 0, "stop after N optimizer steps (0 = train by epochs)"),
        Param("batch_size", "int", batch, "training batch size"),
        Param("eval_batch_size", "int", eval_batch, "evaluation batch size (latency is measured at this size)"),
        Param("max_length", "int", max_len, "maximum tokens per sequence (SQuAD: per window)"),
        Param("lr", "string", "", "learning rate; empty = the variant's own"),
        Param("seed", "int", 42, "seed for initialisation, shuffling and dropout"),
        Param("experiment", "string", f"hpml-{task}",
              "MLflow experiment for direct hpml commands (under mlflow run use --experiment-name)"),
        Param("register", "string", "true", "register the model in the MLflow Model Registry (true|false)"),
        Param("purpose", "string", "real", "tag separating demo | test | real runs in the report and aliases"),
        Param("nproc", "int", 1, "data-parallel worker processes (one per GPU) started by torchrun; batch_size "
              "and eval_batch_size are then global batches split evenly over them"),
        # checkpoints and resume (hpml/checkpoints.py)
        Param("output_dir", "string", "", "checkpoint folder; empty = ./hpml-checkpoints/<run ID>"),
        Param("save_steps", "int", 0, "save a checkpoint every N optimizer steps (0 = at the end of each epoch)"),
        Param("save_total_limit", "int", 2, "checkpoints kept while training (0 = all); older ones are deleted"),
        Param("resume", "string", "", "run ID (or 'latest') to continue from its last checkpoint; the other "
              "parameters are then the run's own"),
    ]


SST2_PARAMS: list[Param] = _common("sst2", model_default="bert-base-uncased", max_train=20000, batch=16,
                                   eval_batch=32, max_len=128, epochs=2.0)
SQUAD_PARAMS: list[Param] = _common("squad", model_default="bert-base-uncased", max_train=0, batch=16,
                                    eval_batch=64, max_len=384, epochs=2.0) + [
    Param("doc_stride", "int", 128, "overlap in tokens between consecutive windows of a long context"),
    Param("n_best", "int", 20, "candidate start/end positions per window in postprocessing"),
    Param("max_answer_length", "int", 30, "longest answer span in tokens"),
    Param("null_threshold", "float", 0.0, "predict no answer when null score - best span score > this"),
    Param("max_tokens", "int", 0, "packed variants (p*): tokens per step, features laid end to end; "
          "0 = batch_size x max_length"),
]
MNLI_PARAMS: list[Param] = _common("mnli", model_default="bert-base-uncased", max_train=20000, batch=16,
                                   eval_batch=32, max_len=128, epochs=2.0)
VRAM_PARAMS: list[Param] = [
    Param("variant", "string", None, "variant ID (either task)"),
    Param("task", "string", "", "squad | sst2 | mnli; empty = the variant's own task"),
    Param("batch_size", "int", 8, "batch size of the probed step (the study used 8)"),
    Param("seq_len", "int", 0, "sequence length; 0 = the task's default max_length (384 squad, 128 sst2/mnli)"),
    Param("precision", "string", "fp16", "autocast dtype of the probed step: fp16 (as the study) | bf16"),
    Param("model", "string", "bert-base-uncased", "hub ID, local checkpoint folder, 'minilm' or random:<size>"),
    Param("experiment", "string", "hpml-vram", "MLflow experiment for direct hpml commands"),
    Param("purpose", "string", "real", "demo | test | real"),
]
REPORT_PARAMS: list[Param] = [
    Param("tracking_uri", "string", "", "tracking server or store; empty = the current one (MLFLOW_TRACKING_URI)"),
    Param("out", "string", "report", "folder for tables and plots"),
    Param("formats", "string", "md,csv,tex", "comma-separated table formats: md, csv, tex"),
    Param("experiments", "string", "", "comma-separated experiment names; empty = every experiment (runs are found by their task tag)"),
    Param("purpose", "string", "", "only runs with this purpose tag (demo | test | real); empty = all"),
]
BENCH_PARAMS: list[Param] = [
    Param("model", "string", "random:bert-base", "model shape/weights: random:<size>, 'minilm' or a checkpoint folder"),
    Param("variants", "string", "a1,a2,a3,a4-nb,a4-b,b3,p1", "comma-separated squad variants, after the reference"),
    Param("max_tokens", "string", "6000,16384", "token budgets of packed variants (one row each)"),
    Param("steps", "int", 60, "timed training steps per row"),
    Param("warmup_steps", "int", 15, "untimed first steps per row (compile, allocator); their excess = warm-up s"),
    Param("batch_size", "int", 32, "features per step of padded rows (the reference's batch)"),
    Param("max_length", "int", 384, "window length: padded width and longest feature"),
    Param("features", "int", 4096, "generated SQuAD-shaped training features (cycled)"),
    Param("eval_features", "int", 2048, "generated features for the eval forward timing"),
    Param("eval_batch_size", "int", 64, "eval rows per padded batch"),
    Param("eval_max_tokens", "int", 32768, "tokens per packed eval batch"),
    Param("seed", "int", 0, "seed of the features, the initialisation and the batch order"),
    Param("profile_steps", "int", 0, "profile this many steady steps per row (GPU busy share, top kernels)"),
    Param("cudagraphs", "string", "false", "true: each compiled padded variant also gets a row <id>+cg compiled "
          "with CUDA graphs (mode reduce-overhead), to show its kernels without the host's launch cost"),
    Param("static_widths", "string", "false", "true: each compiled pad-to-longest variant (a4-nb, a4-b) also gets a "
          "row <id>+sw compiled one graph per padded width (torch.compile's default) instead of one dynamic graph"),
    Param("out", "string", "", "folder for results.json and profiles; empty = none"),
    Param("log", "string", "true", "log a bench run with one child run per row to MLflow (true|false)"),
    Param("experiment", "string", "hpml-bench", "MLflow experiment for direct hpml commands"),
    Param("purpose", "string", "real", "demo | test | real"),
]

REPORT_PARAMS.append(Param("series_run", "string", "",
                           "only the children of this series parent run ID (hpml series sets it); empty = all"))
# `hpml series`: training parameters pass through to every child. Those whose default differs between the
# two tasks are strings, empty = each task's own default (so `all` runs SQuAD and SST-2 each as the study did).
SERIES_PARAMS: list[Param] = [
    Param("name", "string", None, "study table (squad-a, squad-b, squad-c, sst2, all) or comma list of variant IDs"),
    Param("seeds", "int", 1, "repeat every variant with this many seeds (seed, seed+1, …)"),
    Param("seed", "int", 42, "the first seed"),
    Param("model", "string", "bert-base-uncased",
          "hub ID, local checkpoint folder, 'minilm' (the installed all-MiniLM-L6-v2) or random:<size>"),
    Param("data_dir", "string", "", "folder with the task's official-format files, or with squad/ and sst2/ "
          "subfolders for a series of both tasks; empty = the hub datasets"),
    Param("max_train_samples", "string", "", "first N training examples (0 = all); empty = each task's default"),
    Param("max_eval_samples", "int", 0, "use the first N evaluation examples (0 = all)"),
    Param("epochs", "float", 2.0, "training epochs (ignored when max_steps > 0)"),
    Param("max_steps", "int", 0, "stop after N optimizer steps (0 = train by epochs)"),
    Param("batch_size", "int", 16, "training batch size"),
    Param("eval_batch_size", "string", "", "evaluation batch size; empty = each task's default"),
    Param("max_length", "string", "", "maximum tokens per sequence; empty = each task's default"),
    Param("lr", "string", "", "learning rate; empty = each variant's own"),
    Param("doc_stride", "int", 128, "SQuAD: overlap in tokens between consecutive windows"),
    Param("save_steps", "int", 0, "each child saves a checkpoint every N steps (0 = once per epoch): a killed "
          "child resumes from its last one when the series runs again"),
    Param("experiment", "string", "hpml-series",
          "MLflow experiment for direct hpml commands (under mlflow run use --experiment-name)"),
    Param("register", "string", "false", "register every child's model (true|false); off: a series measures"),
    Param("purpose", "string", "real", "demo | test | real, on every child"),
    Param("out", "string", "", "folder for the series' report; empty = report/series-<name>"),
]

COMMAND_PARAMS = {"train_squad": SQUAD_PARAMS, "train_sst2": SST2_PARAMS, "train_mnli": MNLI_PARAMS,
                  "vram_probe": VRAM_PARAMS, "report": REPORT_PARAMS, "series": SERIES_PARAMS,
                  "benchmark": BENCH_PARAMS}
TASK_PARAMS = {"squad": SQUAD_PARAMS, "sst2": SST2_PARAMS, "mnli": MNLI_PARAMS}


def declared_default(param: Param) -> Any:
    """A declared default as the Python value the run uses: "true|false" → bool, lr "" → None (the variant's)."""
    if param.name == "register":
        return str(param.default).lower() == "true"
    if param.name == "lr":
        return None if param.default in ("", None) else float(param.default)
    return param.default


@dataclass
class TrainConfig:
    """Resolved options of one training run; logged as params verbatim.

    Every field left out (None) takes its task's declared default (SQUAD_PARAMS, SST2_PARAMS, …): the
    defaults live only in those declarations. Fields a task does not declare (doc_stride for SST-2) stay None
    and are not logged.
    """

    task: str
    variant: str
    model: Optional[str] = None
    data_dir: Optional[str] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    epochs: Optional[float] = None
    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    eval_batch_size: Optional[int] = None
    max_length: Optional[int] = None
    lr: Optional[float] = None  # None = the variant's own
    seed: Optional[int] = None
    experiment: Optional[str] = None
    register: Optional[bool] = None
    purpose: Optional[str] = None
    nproc: Optional[int] = None  # data-parallel workers (hpml.launch); batch sizes are global
    output_dir: Optional[str] = None  # empty = ./hpml-checkpoints/<run ID>
    save_steps: Optional[int] = None  # 0 = once per epoch
    save_total_limit: Optional[int] = None
    resume: Optional[str] = None  # never logged: a resumed run keeps its own params
    # SQuAD only
    doc_stride: Optional[int] = None
    n_best: Optional[int] = None
    max_answer_length: Optional[int] = None
    null_threshold: Optional[float] = None
    max_tokens: Optional[int] = None  # packed variants only; 0 = batch_size * max_length
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for p in TASK_PARAMS.get(self.task, []):
            if p.name != "variant" and getattr(self, p.name, None) is None:
                setattr(self, p.name, declared_default(p))

    def declared(self) -> dict[str, Any]:
        """The task's declared options with their values (what the run logs under resolved.*)."""
        names = [p.name for p in TASK_PARAMS[self.task]]
        return {"task": self.task, **{n: getattr(self, n) for n in names}}


@dataclass
class ProbeConfig:
    """Options of one vram_probe run; left-out fields take VRAM_PARAMS' declared defaults."""

    variant: str
    task: Optional[str] = None
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    precision: Optional[str] = None
    model: Optional[str] = None
    experiment: Optional[str] = None
    purpose: Optional[str] = None

    def __post_init__(self) -> None:
        for p in VRAM_PARAMS:
            if p.name != "variant" and getattr(self, p.name) is None:
                setattr(self, p.name, declared_default(p))


def short_model(model: str) -> str:
    """A model reference short enough for a run description or a report cell: `minilm`, `random:tiny`,
    `bert-base-uncased` (a hub ID or folder loses its owner/parent path)."""
    model = str(model or "").strip()
    return model if model.startswith("random:") else model.rstrip("/").rsplit("/", 1)[-1]


def small_run_note(task: str, purpose: str, max_steps: int, max_train_samples: int) -> Optional[str]:
    """One line when a run looks like a smoke test (max_steps, or fewer training rows than the task's default)
    but keeps purpose=real: its version would compete for `champion` with full runs. hpml warns rather than
    switching the purpose itself: a real study on a subset (study 2 used 20,000 SST-2 rows) is legitimate."""
    default = TASK_PARAMS[task]
    rows = next(p.default for p in default if p.name == "max_train_samples")
    why = [f"max_steps={max_steps}"] if max_steps > 0 else []
    if max_train_samples and (not rows or max_train_samples < rows):
        why.append(f"max_train_samples={max_train_samples}")
    if purpose != "real" or not why:
        return None
    return (f"purpose=real on a small run ({', '.join(why)}): it competes with full runs for the champion alias "
            "and the report's real rows; pass purpose test for a smoke run")
