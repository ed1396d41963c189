"""Tests for hpml.data.squad: reading, windows and labels, cached tokenization, span postprocessing."""
import json
import os

import datasets
import numpy as np
import pytest
import transformers

from hpml.data.squad import (
    CLS_INDEX,
    feature_cache_key,
    load_squad,
    load_squad_json,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    tokenize_cached,
)
from hpml.data.synthetic import write_squad
from hpml.errors import HpmlError
from hpml.metrics.squad_v2 import normalize_answer

MAX_LENGTH, STRIDE = 384, 128


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("squad")
    write_squad(str(out), n_train=400, n_dev=150, seed=3)
    return str(out)


@pytest.fixture(scope="module")
def windows(tokenizer, data_dir):
    """Train and eval features of the same examples; both functions cut the same windows in the same order."""
    ds = load_squad(data_dir, "train")
    train = ds.map(lambda b: prepare_train_features(b, tokenizer, MAX_LENGTH, STRIDE), batched=True,
                   remove_columns=ds.column_names)
    evalf = ds.map(lambda b: prepare_eval_features(b, tokenizer, MAX_LENGTH, STRIDE), batched=True,
                   remove_columns=ds.column_names)
    return ds, train, evalf


# ---- reading ------------------------------------------------------------------------------------------------
def test_load_squad_json_flattens_and_keeps_unanswerable_empty(data_dir):
    records = load_squad_json(os.path.join(data_dir, "train-v2.0.json"))
    assert len(records) == 400
    assert set(records[0]) == {"id", "title", "context", "question", "answers"}
    unanswerable = [r for r in records if not r["answers"]["text"]]
    assert unanswerable and all(r["answers"]["answer_start"] == [] for r in unanswerable)
    for r in records:
        for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert r["context"][start : start + len(text)] == text


def test_load_squad_local_matches_hub_schema(data_dir):
    ds = load_squad(data_dir, "validation")
    assert len(ds) == 150
    assert ds.features["answers"]["answer_start"].feature == datasets.Value("int32")
    assert ds.column_names == ["id", "title", "context", "question", "answers"]


def test_load_squad_hub_failure_says_to_pass_data_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'rajpurkar/squad_v2' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HpmlError, match="pass data_dir") as caught:
        load_squad("", "train")
    assert "\n" not in str(caught.value)


def _write(tmp_path, obj, name="bad.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_malformed_json_names_the_file(tmp_path):
    path = _write(tmp_path, '{"data": [')
    with pytest.raises(HpmlError, match=r"bad\.json: not valid JSON"):
        load_squad_json(path)
    with pytest.raises(HpmlError, match=r"missing\.json: no such file"):
        load_squad_json(str(tmp_path / "missing.json"))


def test_bad_answer_start_names_file_and_question(tmp_path):
    doc = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{
        "context": "The capital of Belora is Kastin.",
        "qas": [{"id": "q-7", "question": "What is the capital of Belora?", "is_impossible": False,
                 "answers": [{"text": "Kastin", "answer_start": 3}]}]}]}]}
    path = _write(tmp_path, doc)
    with pytest.raises(HpmlError, match=r"bad\.json: question q-7: answer 'Kastin' is not at answer_start 3") as caught:
        load_squad_json(path)
    assert "\n" not in str(caught.value)
    # Scoring never looks at answer_start, like the official script.
    assert load_squad_json(path, check_spans=False)[0]["answers"]["text"] == ["Kastin"]


def test_missing_keys_and_empty_files_are_errors(tmp_path):
    with pytest.raises(HpmlError, match=r"bad\.json: the top level has no \"data\""):
        load_squad_json(_write(tmp_path, {"version": "v2.0"}))
    no_question = {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "q1", "answers": []}]}]}]}
    with pytest.raises(HpmlError, match=r"question q1 has no \"question\""):
        load_squad_json(_write(tmp_path, no_question))
    with pytest.raises(HpmlError, match=r"holds no questions"):
        load_squad_json(_write(tmp_path, {"version": "v2.0", "data": []}))


# ---- windows and labels -------------------------------------------------------------------------------------
def test_labels_decode_to_the_gold_answer(windows):
    ds, train, evalf = windows
    assert len(train) == len(evalf) and train["input_ids"] == evalf["input_ids"]
    by_id = {r["id"]: r for r in ds}
    labeled = set()
    for feat, ev in zip(train, evalf):
        example = by_id[ev["example_id"]]
        s, e = feat["start_positions"], feat["end_positions"]
        context_chars = [o for o in ev["offset_mapping"] if o is not None]
        if not example["answers"]["text"]:
            assert (s, e) == (CLS_INDEX, CLS_INDEX)
            continue
        start_char = example["answers"]["answer_start"][0]
        end_char = start_char + len(example["answers"]["text"][0])
        inside = context_chars[0][0] <= start_char and end_char <= context_chars[-1][1]
        if not inside:
            assert (s, e) == (CLS_INDEX, CLS_INDEX)
            continue
        assert 0 < s <= e < len(feat["input_ids"])
        span = example["context"][ev["offset_mapping"][s][0] : ev["offset_mapping"][e][1]]
        assert span == example["answers"]["text"][0]
        assert normalize_answer(span) == normalize_answer(example["answers"]["text"][0])
        labeled.add(example["id"])
    # Every answerable question is labeled in at least one of its windows.
    assert labeled == {r["id"] for r in ds if r["answers"]["text"]}


def test_features_are_unpadded_and_eval_marks_non_context_tokens(windows):
    _, train, evalf = windows
    lengths = [len(x) for x in train["input_ids"]]
    assert max(lengths) == MAX_LENGTH and min(lengths) < MAX_LENGTH
    assert all(sum(m) == len(m) for m in train["attention_mask"])
    assert "offset_mapping" not in train.column_names and "example_id" not in train.column_names
    offsets = evalf[0]["offset_mapping"]
    types = evalf[0]["token_type_ids"]
    assert offsets[0] is None and offsets[-1] is None  # [CLS] and the final [SEP]
    assert all((o is not None) == (t == 1 and i < len(types) - 1) for i, (o, t) in enumerate(zip(offsets, types)))


def test_long_contexts_give_several_windows_with_answers_past_the_first(windows):
    ds, train, evalf = windows
    per_example = {}
    for i, qid in enumerate(evalf["example_id"]):
        per_example.setdefault(qid, []).append(i)
    multi = {q: idx for q, idx in per_example.items() if len(idx) > 1}
    assert multi, "expected some contexts longer than one window"
    starts = train["start_positions"]
    beyond_first = [q for q, idx in multi.items()
                    if starts[idx[0]] == CLS_INDEX and any(starts[i] != CLS_INDEX for i in idx[1:])]
    assert beyond_first, "expected some answers that only a later window holds"
    # Consecutive windows overlap by doc_stride tokens.
    q, idx = next(iter(multi.items()))
    first = [o for o in evalf[idx[0]]["offset_mapping"] if o is not None]
    second = [o for o in evalf[idx[1]]["offset_mapping"] if o is not None]
    assert first[-STRIDE:] == second[:STRIDE]


def test_windows_reach_the_end_of_every_context(windows):
    """The last window of each question ends at its context's last character: no text is dropped."""
    ds, _, evalf = windows
    reached = {}
    for qid, offsets in zip(evalf["example_id"], evalf["offset_mapping"]):
        ends = [o[1] for o in offsets if o is not None]
        reached[qid] = max(reached.get(qid, 0), max(ends))
    for row in ds:
        assert reached[row["id"]] == len(row["context"].rstrip()), row["id"]


class DropsLaterWindows:
    """A tokenizer that keeps only the first two overflow windows, as tokenizers 0.23.1-0.23.2 do."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        enc = self.tokenizer(*args, **kwargs)
        return transformers.BatchEncoding({k: v[:2] for k, v in enc.items()}, encoding=enc.encodings[:2])


def test_a_tokenizer_that_drops_windows_is_refused_in_one_line(tokenizer, data_dir):
    ds = load_squad(data_dir, "train").select(range(20))
    with pytest.raises(HpmlError, match=r"drops the stride windows of long contexts .*tokenizers>=0\.23\.3"):
        prepare_train_features(ds[:], DropsLaterWindows(tokenizer), MAX_LENGTH, STRIDE)


# ---- cached tokenization -------------------------------------------------------------------------------------
def test_tokenize_cached_does_not_run_twice(tmp_path, tokenizer, data_dir):
    ds = load_squad(data_dir, "validation")
    calls = []

    def fn(batch):
        calls.append(len(batch["id"]))
        return prepare_eval_features(batch, tokenizer, MAX_LENGTH, STRIDE)

    key = feature_cache_key(ds._fingerprint, tokenizer.name_or_path, MAX_LENGTH, STRIDE, "eval")
    first = tokenize_cached(ds, fn, str(tmp_path), key, ds.column_names)
    n_calls = len(calls)
    assert n_calls > 0 and os.path.exists(tmp_path / f"{key}.arrow")
    second = tokenize_cached(ds, fn, str(tmp_path), key, ds.column_names)
    assert len(calls) == n_calls
    assert second["input_ids"] == first["input_ids"] and second["example_id"] == first["example_id"]
    other = feature_cache_key(ds._fingerprint, tokenizer.name_or_path, MAX_LENGTH, 64, "eval")
    assert other != key
    tokenize_cached(ds, fn, str(tmp_path), other, ds.column_names)
    assert len(calls) > n_calls


def test_feature_cache_key_changes_with_each_input():
    base = ("fp", "tok", 384, 128, "train")
    keys = {feature_cache_key(*base)}
    for i, changed in enumerate(["fp2", "tok2", 256, 64, "eval"]):
        args = list(base)
        args[i] = changed
        keys.add(feature_cache_key(*args))
    assert len(keys) == 6 and feature_cache_key(*base) == feature_cache_key(*base)


# ---- postprocessing ------------------------------------------------------------------------------------------
def test_random_logits_always_give_exact_context_substrings(windows):
    ds, _, evalf = windows
    rng = np.random.default_rng(0)
    n = len(evalf)
    # One 2-D array padded with -100 past each feature's length, as a padded eval loop would return.
    start = np.full((n, MAX_LENGTH + 16), -100.0)
    end = np.full((n, MAX_LENGTH + 16), -100.0)
    for i, ids in enumerate(evalf["input_ids"]):
        start[i, : len(ids)] = rng.normal(size=len(ids))
        end[i, : len(ids)] = rng.normal(size=len(ids))
    result = postprocess_predictions(ds, evalf, start, end, null_threshold=float("inf"))
    contexts = dict(zip(ds["id"], ds["context"]))
    assert set(result.predictions) == set(contexts)
    for row in result.rows:
        answer = row["answer"]
        assert answer and answer in contexts[row["id"]]
        assert result.null_odds[row["id"]] == pytest.approx(row["null_score"] - row["score"])
    # With the default threshold, "" exactly where the null score beats the best span.
    default = postprocess_predictions(ds, evalf, start, end)
    for row in default.rows:
        assert (row["answer"] == "") == (row["null_score"] - row["score"] > 0.0)


def _toy():
    # One question, context "alpha beta gamma", cut into two windows: [alpha beta] and [beta gamma].
    examples = [{"id": "q", "context": "alpha beta gamma"}]
    features = [
        {"example_id": "q", "offset_mapping": [None, None, None, [0, 5], [6, 10], None]},
        {"example_id": "q", "offset_mapping": [None, None, None, [6, 10], [11, 16], None]},
    ]
    return examples, features


def test_null_score_is_the_minimum_over_windows_and_the_null_rule():
    examples, features = _toy()
    start = [np.array([2.0, 0, 0, 1.0, 0, 0]), np.array([5.0, 0, 0, 0, 3.0, 0])]
    end = [np.array([1.0, 0, 0, 0, 1.5, 0]), np.array([4.0, 0, 0, 0, 2.0, 0])]
    result = postprocess_predictions(examples, features, start, end)
    # Window 1: null 3.0, best span alpha..beta = 1.0 + 1.5 = 2.5. Window 2: null 9.0, best gamma = 5.0.
    row = result.rows[0]
    assert row["null_score"] == 3.0 and row["score"] == 5.0
    assert result.null_odds["q"] == -2.0
    assert result.predictions["q"] == "gamma"
    # Predict "" only when null - best > threshold: -2.0 > -2.5 yes, -2.0 > -1.5 no.
    assert postprocess_predictions(examples, features, start, end, null_threshold=-2.5).predictions["q"] == ""
    assert postprocess_predictions(examples, features, start, end, null_threshold=-1.5).predictions["q"] == "gamma"


def test_spans_respect_order_and_max_answer_length():
    examples, features = _toy()
    # The highest end logit sits before the highest start: that span is invalid.
    start = [np.array([0.0, 0, 0, 0, 9.0, 0]), np.array([0.0, 0, 0, 0, 0, 0])]
    end = [np.array([0.0, 0, 0, 9.0, 1.0, 0]), np.array([0.0, 0, 0, 0, 0, 0])]
    result = postprocess_predictions(examples, features, start, end)
    assert result.predictions["q"] == "beta" and result.rows[0]["score"] == 10.0
    start = [np.array([0.0, 0, 0, 5.0, 0, 0]), np.array([0.0] * 6)]
    end = [np.array([0.0, 0, 0, 0, 5.0, 0]), np.array([0.0] * 6)]
    assert postprocess_predictions(examples, features, start, end).predictions["q"] == "alpha beta"
    one_token = postprocess_predictions(examples, features, start, end, max_answer_length=1)
    assert one_token.predictions["q"] in {"alpha", "beta", "gamma"}


def test_missing_features_for_an_example_is_a_bug_not_a_silent_blank():
    examples, features = _toy()
    examples.append({"id": "other", "context": "x"})
    zeros = [np.zeros(6), np.zeros(6)]
    with pytest.raises(ValueError, match="question other has no features"):
        postprocess_predictions(examples, features, zeros, zeros)

