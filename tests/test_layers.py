"""Module boundaries that keep the code extensible: tracking imports no other hpml module, the export layer
no mlflow, no module branches on a task name, and run defaults come only from the declared parameters."""
import ast
import re

from hpml.config import TASK_PARAMS, VRAM_PARAMS, ProbeConfig, TrainConfig, declared_default

from conftest import REPO


def imports_of(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_tracking_is_a_leaf_and_export_has_no_mlflow():
    hpml_deps = {n for n in imports_of(REPO / "hpml" / "tracking.py") if n.startswith("hpml")}
    # signals (deferring a Ctrl-C around registration) and store (the SQLite schema lock) are leaves themselves
    leaves = {"hpml.errors", "hpml.errors.HpmlError", "hpml.errors.UsageError", "hpml.signals", "hpml.store",
              "hpml.store.init_sqlite"}
    assert hpml_deps <= leaves, hpml_deps
    assert not [n for n in imports_of(REPO / "hpml" / "export.py") if n.startswith("mlflow")]
    # the training path, the technique pipeline, the task specs and the probe reach MLflow only via tracking.py
    paths = [REPO / "hpml" / f for f in ("training.py", "modeling.py", "probe.py", "export.py")]
    paths += list((REPO / "hpml" / "tasks").glob("*.py"))
    assert not [p.name for p in paths if any(n.startswith("mlflow") for n in imports_of(p))]


def test_the_training_and_serving_path_never_branches_on_a_task_name():
    """The path every task goes through asks its spec instead. (The report's tables are per study by design;
    series.py, demo.py and the packed-variant check name tasks on purpose.)"""
    pattern = re.compile(r"""(task|\.name)\s*[!=]=\s*["'](squad|sst2|mnli)["']""")
    owned = ["training.py", "modeling.py", "export.py", "serving.py", "tracking.py", "probe.py", "cli.py"]
    paths = [REPO / "hpml" / f for f in owned] + list((REPO / "hpml" / "tasks").glob("*.py"))
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in paths
                 for i, line in enumerate(p.read_text().splitlines(), start=1) if pattern.search(line)]
    assert offenders == []


def test_run_defaults_are_the_declared_ones():
    for task, params in TASK_PARAMS.items():
        cfg = TrainConfig(task=task, variant="x")
        for p in params:
            if p.name != "variant":
                assert getattr(cfg, p.name) == declared_default(p), (task, p.name)
    assert TrainConfig(task="sst2", variant="x").doc_stride is None  # a SQuAD-only option stays unset
    assert TrainConfig(task="squad", variant="x", register=False, seed=7).register is False
    probe = ProbeConfig(variant="a3")
    assert {p.name: getattr(probe, p.name) for p in VRAM_PARAMS if p.name != "variant"} == {
        p.name: p.default for p in VRAM_PARAMS if p.name != "variant"}
