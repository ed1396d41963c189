"""The parameters of each command, declared once: click options and the MLproject test both read this."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


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
    ]


SST2_PARAMS: list[Param] = _common("sst2", model_default="bert-base-uncased", max_train=20000, batch=16,
                                   eval_batch=32, max_len=128, epochs=2.0)
SQUAD_PARAMS: list[Param] = _common("squad", model_default="bert-base-uncased", max_train=0, batch=16,
                                    eval_batch=64, max_len=384, epochs=2.0) + [
    Param("doc_stride", "int", 128, "overlap in tokens between consecutive windows of a long context"),
    Param("n_best", "int", 20, "candidate start/end positions per window in postprocessing"),
    Param("max_answer_length", "int", 30, "longest answer span in tokens"),
    Param("null_threshold", "float", 0.0, "predict no answer when null score - best span score > this"),
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

COMMAND_PARAMS = {"train_squad": SQUAD_PARAMS, "train_sst2": SST2_PARAMS, "train_mnli": MNLI_PARAMS,
                  "vram_probe": VRAM_PARAMS, "report": REPORT_PARAMS}
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
    # SQuAD only
    doc_stride: Optional[int] = None
    n_best: Optional[int] = None
    max_answer_length: Optional[int] = None
    null_threshold: Optional[float] = None
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
