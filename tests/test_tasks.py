"""Task specs: SQuAD's pure evaluate agrees with `hpml score` at every null threshold; hub fingerprints carry
the dataset revision; eval timing starts after a warm-up batch; the spec registry drives the CLI."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from hpml.metrics import squad_v2
from hpml.tasks import Prepared, all_tasks, get_task

CONTEXT = "red apple pie"
# One window per question: [CLS] question [SEP] red apple pie [SEP]; offsets None outside the context.
OFFSETS = [None, None, None, [0, 3], [4, 9], [10, 13], None]


def logits(span_at: int, span_score: float, null_score: float):
    start, end = np.full(7, -10.0), np.full(7, -10.0)
    start[span_at] = end[span_at] = span_score / 2
    start[0] = end[0] = null_score / 2
    return start, end


def hand_built_squad():
    """q1 is answerable ("apple") with null odds +1.5; q2 is unanswerable with null odds -1.0."""
    examples = [{"id": "q1", "context": CONTEXT, "answers": {"text": ["apple"], "answer_start": [4]}},
                {"id": "q2", "context": CONTEXT, "answers": {"text": [], "answer_start": []}}]
    features = [{"example_id": "q1", "offset_mapping": OFFSETS}, {"example_id": "q2", "offset_mapping": OFFSETS}]
    (s1, e1), (s2, e2) = logits(4, 10.0, 11.5), logits(4, 10.0, 9.0)
    return Prepared(None, examples, features, ""), (np.stack([s1, s2]), np.stack([e1, e2]))


def official_file(path):
    qas = [{"id": "q1", "question": "which fruit?", "answers": [{"text": "apple", "answer_start": 4}]},
           {"id": "q2", "question": "which vegetable?", "answers": []}]
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": CONTEXT, "qas": qas}]}]}))
    return str(path)


@pytest.mark.parametrize("threshold,answers,exact", [
    (2.0, {"q1": "apple", "q2": "apple"}, 50.0),  # odds 1.5 <= 2: answered, and right (the old bug: EM 0 here)
    (0.0, {"q1": "", "q2": "apple"}, 0.0),
    (-2.0, {"q1": "", "q2": ""}, 50.0),
])
def test_squad_logged_scores_equal_hpml_score_on_the_saved_files(threshold, answers, exact, tmp_path):
    prep, predictions = hand_built_squad()
    cfg = SimpleNamespace(n_best=20, max_answer_length=30, null_threshold=threshold)
    result = get_task("squad").evaluate(predictions, prep, cfg)
    assert result.artifacts["predictions.json"] == answers
    assert result.metrics["eval_exact"] == exact
    for name, obj in result.artifacts.items():
        (tmp_path / name).write_text(json.dumps(obj))
    scored = squad_v2.score_files(official_file(tmp_path / "dev.json"), str(tmp_path / "predictions.json"),
                                  str(tmp_path / "null_odds.json"))
    assert {f"eval_{k}": v for k, v in scored.items()} == result.metrics


def test_hub_fingerprint_follows_the_dataset_revision(monkeypatch):
    import datasets

    import hpml.data.sst2
    import hpml.tasks

    loaded_at = []

    def fake_load(data_dir, split, max_samples=0, revision=None):
        loaded_at.append(revision)
        return datasets.Dataset.from_dict({"sentence": ["a fine film", "a dull film"], "label": [1, 0]})

    monkeypatch.setattr(hpml.data.sst2, "load_sst2", fake_load)
    spec = get_task("sst2")
    cfg = SimpleNamespace(data_dir="", max_train_samples=0, max_eval_samples=0, max_length=16)
    def tokenizer(*texts, truncation, max_length):
        return {"input_ids": [[1, 2]] * len(texts[0])}

    prints = {}
    for revision in ("abc123", "def456"):
        monkeypatch.setattr(hpml.tasks, "hub_revision", lambda repo, r=revision: r)
        prints[revision] = spec.prepare(cfg, tokenizer, "").fingerprint
    assert prints["abc123"] != prints["def456"]
    assert loaded_at == ["abc123", "abc123", "def456", "def456"]  # train and dev, each at the resolved commit


def test_eval_is_timed_after_one_warm_up_batch():
    from hpml.training import timed_predict

    calls = []
    trainer = SimpleNamespace(predict=lambda feats: calls.append(len(feats)) or len(calls))

    class Feats(list):
        def select(self, idx):
            return Feats(self[i] for i in idx)

    assert timed_predict(trainer, Feats(range(100)), 32) == 2  # the second (timed) call's answer is returned
    assert calls == [32, 100]


def test_every_task_has_a_cli_command_an_mlproject_entry_and_make_data(tmp_path):
    from click.testing import CliRunner

    from hpml.cli import main
    from hpml.config import COMMAND_PARAMS

    for name, spec in all_tasks().items():
        assert spec.command in main.commands and spec.entry_point in COMMAND_PARAMS
        out = CliRunner().invoke(main, ["make-data", name, "--out", str(tmp_path / name), "--train", "9", "--dev", "6"])
        assert out.exit_code == 0, out.output
        assert len(out.output.split()) == 2


def test_a_new_eval_limit_reuses_the_cached_training_features(squad_dir, tokenizer, tmp_path, monkeypatch):
    # Each split's features are cached under that split's own key: changing max_eval_samples (a quicker
    # evaluation) used to tokenize the whole training set again.
    import hpml.data.squad

    made = []
    real = hpml.data.squad.prepare_train_features
    monkeypatch.setattr(hpml.data.squad, "prepare_train_features", lambda *a, **k: made.append(1) or real(*a, **k))
    spec = get_task("squad")
    cfg = SimpleNamespace(data_dir=str(squad_dir), max_train_samples=0, max_eval_samples=10, max_length=128,
                          doc_stride=32)
    first = spec.prepare(cfg, tokenizer, str(tmp_path))
    assert made
    n = len(made)
    second = spec.prepare(SimpleNamespace(**{**vars(cfg), "max_eval_samples": 20}), tokenizer, str(tmp_path))
    assert len(made) == n  # the training features came from the cache
    assert len(second.eval_features) > len(first.eval_features) and second.fingerprint != first.fingerprint
    spec.prepare(SimpleNamespace(**{**vars(cfg), "max_train_samples": 30}), tokenizer, str(tmp_path))
    assert len(made) > n  # another training limit is another set of training features


def test_file_digest_reads_an_unchanged_file_once_and_a_changed_one_again(tmp_path, monkeypatch):
    import builtins
    import hashlib

    from hpml.tasks import file_digest

    f = tmp_path / "train.tsv"
    f.write_text("abc")
    first = file_digest(str(f))
    assert first == hashlib.sha256(b"abc").hexdigest()
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert file_digest(str(f)) == first and opened == []  # the same file, unchanged: not read again
    f.write_text("abcd")
    assert file_digest(str(f)) == hashlib.sha256(b"abcd").hexdigest()
