"""MLflow-native lineage: every training run logs its datasets as inputs (name, digest, source, context) and a
description naming variant and model; the digests differ exactly when the data differ."""
import json
import shutil

from mlflow import MlflowClient

from hpml import tracking
from hpml.config import TrainConfig
from hpml.training import run_identity, run_training


def tiny(data_dir, **kw):
    return TrainConfig(task="sst2", variant="fp32", model="random:tiny", data_dir=str(data_dir), max_steps=1,
                       batch_size=8, eval_batch_size=16, max_length=32, purpose="test", register=False, **kw)


def inputs_of(client, run_id):
    run = client.get_run(run_id)
    return {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}, run


def test_runs_log_dataset_inputs_that_follow_the_data(sst2_dir, tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    first = run_training(tiny(sst2_dir, max_train_samples=40))
    ds, run = inputs_of(client, first["run_id"])
    assert set(ds) == {"train", "eval"}
    assert ds["train"].name == "sst2-train[:40]" and ds["eval"].name == "sst2-validation"
    assert json.loads(ds["train"].source)["uri"].endswith("train.tsv") and ds["train"].source_type == "local"
    assert len(ds["train"].digest) == 16 and ds["train"].digest != ds["eval"].digest
    note = run.data.tags[tracking.TAG_DESCRIPTION]
    assert note.startswith("fp32 on random:tiny:") and "seed 42" in note and "max_steps 1" in note

    # Same files, other training limit: the train input changes, the eval input does not.
    second = run_training(tiny(sst2_dir, max_train_samples=48))
    ds2, _ = inputs_of(client, second["run_id"])
    assert ds2["train"].digest != ds["train"].digest and ds2["eval"].digest == ds["eval"].digest

    # Same names and limits, one edited dev file: only the eval input (and the data fingerprint) changes.
    edited = tmp_path / "edited"
    shutil.copytree(sst2_dir, edited)
    dev = edited / "dev.tsv"
    lines = dev.read_text().splitlines()
    dev.write_text("\n".join(lines[:-1]) + "\n")
    cfg = tiny(edited, max_train_samples=40)
    assert run_identity(cfg)[tracking.TAG_FINGERPRINT] != run.data.tags[tracking.TAG_FINGERPRINT]
    third = run_training(cfg)
    ds3, run3 = inputs_of(client, third["run_id"])
    assert ds3["train"].digest == ds["train"].digest and ds3["eval"].digest != ds["eval"].digest
    # the identity `hpml series` computes before a run equals the tags the run then carries
    assert run_identity(cfg) == {k: run3.data.tags[k] for k in (tracking.TAG_CONFIG_HASH, tracking.TAG_FINGERPRINT)}
