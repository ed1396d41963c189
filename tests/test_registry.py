"""Registry: version tags, the champion alias rule (docs/conventions.md), registry errors, `hpml models`."""
import json

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from hpml import cli, serving, tracking
from hpml.tasks import all_tasks, get_task


@pytest.fixture
def export(tmp_path):
    """An export folder without weights: registering never loads the model, so this is all it needs."""
    out = tmp_path / "export"
    (out / serving.MODEL_DIR).mkdir(parents=True)
    (out / serving.META_FILE).write_text(json.dumps({"task": "sst2", "variant": "fp32", "kind": "full"}))
    return str(out)


def register(export, task, variant, metrics, purpose="test", fingerprint="fp-a"):
    """One run, one registered version, as training does it; returns (version, became champion, run id)."""
    tags = {tracking.TAG_VARIANT: variant, tracking.TAG_PURPOSE: purpose, tracking.TAG_FINGERPRINT: fingerprint}
    tracking.connect()
    mlflow.set_experiment("hpml-registry-test")  # not an experiment id cached from another test's store
    spec = get_task(task)
    with mlflow.start_run() as run:
        version, became = tracking.register_model(export, tracking.registered_model_name(task, variant),
                                                  serving.model_spec(spec, quantized=False), spec.headline,
                                                  metrics, tags)
    return version, became, run.info.run_id


def champion(name):
    return int(MlflowClient().get_model_version_by_alias(name, tracking.CHAMPION).version)


def test_champion_rule_purpose_rank_then_newest_data_then_strictly_better(export, tracking_uri):
    acc = tracking.M_ACCURACY
    steps = [  # (accuracy, purpose, fingerprint, becomes champion, champion afterwards)
        (0.60, "test", "fp-a", True, 1),  # the first version always
        (0.80, "test", "fp-a", True, 2),  # strictly better
        (0.70, "test", "fp-a", False, 2),  # newer but worse: the champion stays the best
        (0.80, "test", "fp-a", False, 2),  # a tie is not strictly greater
        (0.50, "demo", "fp-a", False, 2),  # demo and test rank alike: same data, worse, stays
        (0.40, "test", "fp-b", True, 6),  # new data: the newest fingerprint wins, even when its number is lower
        (0.55, "real", "fp-c", True, 7),  # a real version displaces a test/demo champion
        (0.99, "test", "fp-c", False, 7),  # … and is not displaced by them
        (0.50, "real", "fp-c", False, 7),  # real vs real on the same data: strictly better only
        (0.30, "real", "fp-d", True, 10),  # real on new data displaces the real champion of old data
    ]
    for i, (value, purpose, fp, becomes, champ) in enumerate(steps, start=1):
        version, became, run_id = register(export, "sst2", "fp32", {acc: value, "train_loss": 1.0}, purpose, fp)
        assert (version, became, champion("hpml-sst2-fp32")) == (i, becomes, champ), f"step {i}"
        tags = MlflowClient().get_model_version("hpml-sst2-fp32", str(version)).tags
        assert tags[tracking.TAG_VARIANT] == "fp32" and tags["run_id"] == run_id
        assert tags[tracking.TAG_PURPOSE] == purpose and tags[tracking.TAG_FINGERPRINT] == fp
        assert float(tags[acc]) == value and "train_loss" not in tags


def test_squad_champion_follows_f1_not_exact_match(export, tracking_uri):
    assert register(export, "squad", "a2", {tracking.M_F1: 50.0, tracking.M_EXACT: 40.0})[1]
    version, became, _ = register(export, "squad", "a2", {tracking.M_F1: 45.0, tracking.M_EXACT: 44.0})
    assert (version, became, champion("hpml-squad-a2")) == (2, False, 1)
    tags = MlflowClient().get_model_version("hpml-squad-a2", "2").tags
    assert float(tags[tracking.M_F1]) == 45.0 and float(tags[tracking.M_EXACT]) == 44.0


def test_models_lists_versions_aliases_metric_and_purpose(export, tracking_uri):
    runner = CliRunner()
    empty = runner.invoke(cli.main, ["models"])
    assert empty.exit_code == 0 and empty.stdout.strip() == f"no hpml models registered at {tracking_uri}"
    register(export, "sst2", "lora", {tracking.M_ACCURACY: 0.75})
    register(export, "sst2", "lora", {tracking.M_ACCURACY: 0.7})
    _, _, squad_run = register(export, "squad", "b1", {tracking.M_F1: 61.234567}, purpose="real")
    MlflowClient().create_registered_model("someone-else")  # not an hpml model: not listed

    rows = tracking.list_registered({name: spec.headline for name, spec in all_tasks().items()})
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [
        ("hpml-squad-b1", 1, ["champion"]), ("hpml-sst2-lora", 1, ["champion"]), ("hpml-sst2-lora", 2, [])]
    assert rows[0]["metric"] == tracking.M_F1 and rows[0]["value"] == 61.234567 and rows[0]["run_id"] == squad_run

    out = runner.invoke(cli.main, ["models"])
    assert out.exit_code == 0, out.output
    lines = [ln.split() for ln in out.stdout.strip().splitlines()]
    assert lines[0] == ["MODEL", "VERSION", "ALIASES", "VARIANT", "PURPOSE", "METRIC", "VALUE", "RUN"]
    assert lines[1] == ["hpml-squad-b1", "1", "champion", "b1", "real", "eval_f1", "61.23", squad_run]
    assert lines[2][:7] == ["hpml-sst2-lora", "1", "champion", "lora", "test", "eval_accuracy", "0.75"]
    assert lines[3][:7] == ["hpml-sst2-lora", "2", "-", "lora", "test", "eval_accuracy", "0.7"]
    only_squad = runner.invoke(cli.main, ["models", "--task", "squad"])
    assert [ln.split()[0] for ln in only_squad.stdout.strip().splitlines()] == ["MODEL", "hpml-squad-b1"]


def test_a_registry_error_is_not_read_as_no_champion_and_leaves_no_version(export, tracking_uri, monkeypatch):
    """Only "alias not found" means no champion: any other error propagates, the new version is deleted, and
    the alias stays where it was."""
    from mlflow.exceptions import MlflowException

    register(export, "sst2", "fp32", {tracking.M_ACCURACY: 0.9})

    def broken(self, name, alias):
        raise MlflowException("database is locked", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", broken)
    with pytest.raises(MlflowException, match="database is locked"):
        register(export, "sst2", "fp32", {tracking.M_ACCURACY: 0.5})
    monkeypatch.undo()
    assert champion("hpml-sst2-fp32") == 1
    assert [int(v.version) for v in MlflowClient().search_model_versions("name='hpml-sst2-fp32'")] == [1]


def test_champion_rule_table():
    """The rule itself, on hand-built champions (no registry)."""
    from types import SimpleNamespace

    def champ(purpose, fp, value):
        return SimpleNamespace(tags={tracking.TAG_PURPOSE: purpose, tracking.TAG_FINGERPRINT: fp, "m": repr(value)})

    def tags(purpose, fp):
        return {tracking.TAG_PURPOSE: purpose, tracking.TAG_FINGERPRINT: fp}

    rule = tracking.champion_rule
    assert rule(None, 0.1, tags("test", "a"), "m")
    assert not rule(champ("real", "a", 0.5), 0.9, tags("demo", "a"), "m")
    assert rule(champ("test", "a", 0.5), 0.1, tags("real", "b"), "m")
    assert rule(champ("real", "a", 0.5), 0.1, tags("real", "b"), "m")
    assert not rule(champ("real", "a", 0.5), 0.5, tags("real", "a"), "m")
    assert rule(champ("real", "a", 0.5), 0.51, tags("real", "a"), "m")
