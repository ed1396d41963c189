"""MLproject parameters, CLI options and the declared parameters cannot drift apart."""
import re

import yaml

from hpml.cli import main
from hpml.config import COMMAND_PARAMS

from conftest import REPO

CLI_NAMES = {"train_squad": "train-squad", "train_sst2": "train-sst2", "train_mnli": "train-mnli",
             "vram_probe": "vram-probe", "report": "report"}


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
        assert sorted(used) == sorted((n.replace("_", "-"), n) for n in declared), ep
        assert eps[ep]["command"].startswith(f"python entry_points/{ep}.py ")


def test_cli_options_match_declared_parameters():
    for ep, params in COMMAND_PARAMS.items():
        cmd = main.commands[CLI_NAMES[ep]]
        opts = {o.name: (o.default, o.required) for o in cmd.params}
        assert opts == {p.name: (p.default, p.default is None) for p in params}, ep


def test_entry_points_are_thin():
    for ep, cli_name in CLI_NAMES.items():
        src = (REPO / "entry_points" / f"{ep}.py").read_text()
        assert f'main(["{cli_name}", *sys.argv[1:]]' in src
        assert len(src.splitlines()) < 12
