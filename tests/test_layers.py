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
    assert hpml_deps <= {"hpml.errors", "hpml.errors.HpmlError", "hpml.errors.UsageError"}, hpml_deps
    assert not [n for n in imports_of(REPO / "hpml" / "export.py") if n.startswith("mlflow")]
    mlflow_users = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "hpml").rglob("*.py")
                          if any(n.startswith("mlflow") for n in imports_of(p)))
    assert mlflow_users == ["hpml/pyfunc_model.py", "hpml/serving.py", "hpml/tracking.py"]


def test_no_module_outside_the_task_specs_branches_on_a_task_name():
    pattern = re.compile(r"""(task|\.name)\s*[!=]=\s*["'](squad|sst2|mnli)["']""")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "hpml").rglob("*.py")
                 if "report" not in p.parts  # the report's tables are per study, by design
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
