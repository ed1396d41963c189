"""Registry: version tags, the champion alias rule (best within purpose + data fingerprint), `hpml models`."""
import json

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from hpml import cli, serving, tracking


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
    with mlflow.start_run() as run:
        _, version, became = tracking.register_model(export, task, variant, metrics, tags)
    return version, became, run.info.run_id


def champion(name):
    return int(MlflowClient().get_model_version_by_alias(name, tracking.CHAMPION).version)


def test_champion_is_the_best_of_its_purpose_and_data_not_the_newest(export, tracking_uri):
    acc = tracking.M_ACCURACY
    steps = [  # (accuracy, purpose, fingerprint, becomes champion, champion afterwards)
        (0.60, "test", "fp-a", True, 1),  # the first version always
        (0.80, "test", "fp-a", True, 2),  # strictly better
        (0.70, "test", "fp-a", False, 2),  # newer but worse: the champion stays the best
        (0.80, "test", "fp-a", False, 2),  # a tie is not strictly greater
        (0.95, "demo", "fp-a", False, 2),  # another purpose does not compete
        (0.99, "test", "fp-b", False, 2),  # other data (fingerprint) does not compete
        (0.55, "real", "fp-c", True, 7),  # tracking.should_become_champion: a real version displaces test/demo
        (0.99, "test", "fp-a", False, 7),  # … and is not displaced by them
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

    rows = tracking.list_registered()
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
