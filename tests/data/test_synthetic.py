"""Tests for hpml.data.synthetic: official formats, answerable share, determinism, SQuAD-like lengths."""
import csv
import json
import os

import numpy as np

from hpml.data.squad import load_squad_json
from hpml.data.synthetic import make_squad, make_sst2, write_squad, write_sst2


def _qas(doc):
    return [(p["context"], qa) for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]]


def test_squad_follows_the_official_format():
    doc = make_squad(300, 0)
    assert doc["version"] == "v2.0"
    qas = _qas(doc)
    assert len(qas) == 300
    assert len({qa["id"] for _, qa in qas}) == 300
    for article in doc["data"]:
        assert isinstance(article["title"], str) and article["paragraphs"]
    for context, qa in qas:
        assert set(qa) <= {"id", "question", "answers", "is_impossible", "plausible_answers"}
        assert qa["question"].endswith("?")
        assert qa["is_impossible"] == (not qa["answers"])
        for ans in qa["answers"] + qa.get("plausible_answers", []):
            assert context[ans["answer_start"] : ans["answer_start"] + len(ans["text"])] == ans["text"]


def test_about_half_unanswerable_with_plausible_answers():
    qas = [qa for _, qa in _qas(make_squad(1000, 1))]
    impossible = [qa for qa in qas if qa["is_impossible"]]
    assert 0.4 <= len(impossible) / len(qas) <= 0.6
    with_plausible = [qa for qa in impossible if qa.get("plausible_answers")]
    assert 0.2 <= len(with_plausible) / len(impossible) <= 0.8
    assert all("plausible_answers" not in qa for qa in qas if not qa["is_impossible"])


def test_answers_are_spread_over_the_context():
    positions = [qa["answers"][0]["answer_start"] / len(c) for c, qa in _qas(make_squad(600, 2)) if qa["answers"]]
    assert min(positions) < 0.1 and max(positions) > 0.8


def test_deterministic_and_dev_differs_from_train(tmp_path):
    assert make_squad(120, 5) == make_squad(120, 5)
    assert make_squad(120, 5) != make_squad(120, 6)
    train_path, dev_path = write_squad(str(tmp_path), n_train=120, n_dev=60, seed=5)
    assert (os.path.basename(train_path), os.path.basename(dev_path)) == ("train-v2.0.json", "dev-v2.0.json")
    train, dev = load_squad_json(train_path), load_squad_json(dev_path)
    assert (len(train), len(dev)) == (120, 60)
    assert not {r["id"] for r in train} & {r["id"] for r in dev}
    assert not {r["context"] for r in train} & {r["context"] for r in dev}
    with open(train_path) as f:
        assert json.load(f) == make_squad(120, 5)


def test_dev_has_several_answers_per_question_sometimes():
    counts = [len(qa["answers"]) for _, qa in _qas(make_squad(300, 0, split="dev")) if qa["answers"]]
    assert min(counts) == 1 and max(counts) >= 3


def test_context_lengths_spread_like_squad(tokenizer):
    contexts = {c for c, _ in _qas(make_squad(1500, 0))}
    lengths = np.array([len(ids) for ids in tokenizer(sorted(contexts), add_special_tokens=False)["input_ids"]])
    assert 0.75 <= np.mean((lengths >= 100) & (lengths <= 250))
    assert 0.04 <= np.mean(lengths > 384) <= 0.12


def test_sst2_rows_are_balanced_lowercase_and_deterministic():
    rows = make_sst2(400, 0)
    assert rows == make_sst2(400, 0) and rows != make_sst2(400, 0, split="dev")
    labels = [label for _, label in rows]
    assert set(labels) == {0, 1} and abs(sum(labels) - 200) <= 2
    for sentence, _ in rows:
        assert sentence == sentence.lower() and "\t" not in sentence and sentence.endswith(" .")
    # Negation flips polarity, so single words do not decide the label alone.
    negated = [(s, y) for s, y in rows if " not " in f" {s} " or " n't " in s]
    assert negated and {y for _, y in negated} == {0, 1}


def test_write_sst2_glue_tsv(tmp_path):
    train_path, dev_path = write_sst2(str(tmp_path), n_train=50, n_dev=20, seed=1)
    for path, n in ((train_path, 50), (dev_path, 20)):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert lines[0] == "sentence\tlabel" and len(lines) == n + 1
        rows = list(csv.reader(lines[1:], delimiter="\t", quoting=csv.QUOTE_NONE))
        assert all(len(r) == 2 and r[1] in {"0", "1"} for r in rows)
    assert os.path.basename(train_path) == "train.tsv" and os.path.basename(dev_path) == "dev.tsv"
