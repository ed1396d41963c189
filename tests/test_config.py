"""MLproject parameters, CLI options and the declared parameters cannot drift apart."""
import re

import click
import yaml

from hpml.cli import main
from hpml.config import COMMAND_PARAMS

from conftest import REPO

CLI_NAMES = {"train_squad": "train-squad", "train_sst2": "train-sst2", "train_mnli": "train-mnli",
             "vram_probe": "vram-probe", "report": "report", "series": "series", "benchmark": "bench"}
POSITIONAL = {"series": ["name"]}  # `hpml series NAME`: the MLproject command passes it first, bare


def mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_mlproject_matches_declared_parameters():
    eps = mlproject()["entry_points"]
    assert set(eps) == set(COMMAND_PARAMS)
    for ep, params in COMMAND_PARAMS.items():
        declared = {p.name: (p.type, p.default) for p in params}
        given = {k: (v["type"], v.get("default")) for k, v in eps[ep]["parameters"].items()}
        assert given == declared, ep
        # every parameter reaches the command, under the CLI's option name
        used = re.findall(r"--([a-z-]+) \{([a-z_]+)\}", eps[ep]["command"])
        first = POSITIONAL.get(ep, [])
        assert sorted(used) == sorted((n.replace("_", "-"), n) for n in declared if n not in first), ep
        # exec: mlflow run's shell becomes the entry point, so signals and parent death reach hpml itself
        prefix = " ".join([f"exec python entry_points/{ep}.py", *(f"{{{n}}}" for n in first)])
        assert eps[ep]["command"].startswith(prefix + " "), ep


def test_cli_options_match_declared_parameters():
    for ep, params in COMMAND_PARAMS.items():
        cmd = main.commands[CLI_NAMES[ep]]
        # a required click argument (series NAME) has no default: click stores a sentinel there, not None
        opts = {o.name: (None if isinstance(o, click.Argument) else o.default, o.required) for o in cmd.params}
        assert opts == {p.name: (p.default, p.default is None) for p in params}, ep


def test_entry_points_are_thin():
    for ep, cli_name in CLI_NAMES.items():
        src = (REPO / "entry_points" / f"{ep}.py").read_text()
        assert f'main(["{cli_name}", *sys.argv[1:]]' in src
        assert len(src.splitlines()) < 12


def test_small_real_runs_get_one_line_note():
    from hpml.config import small_run_note

    assert small_run_note("sst2", "real", 0, 20000) is None  # study 2's own subset is a real run
    assert small_run_note("sst2", "test", 5, 100) is None
    assert small_run_note("squad", "real", 0, 0) is None
    note = small_run_note("squad", "real", 2, 64)
    assert note.startswith("purpose=real on a small run (max_steps=2, max_train_samples=64):") and "\n" not in note
    assert "max_train_samples=640" in small_run_note("sst2", "real", 0, 640)
