"""Tests for hpml.metrics.squad_v2: hand-built cases and agreement with the official evaluate-v2.0 logic."""
import collections
import json
import random
import re
import string

import pytest

from hpml.data.synthetic import make_squad
from hpml.errors import HpmlError
from hpml.metrics.squad_v2 import evaluate, exact_score, f1_score, normalize_answer, score_files


# ---- reference: the official evaluate-v2.0.py main path, transcribed (plots and file I/O left out) ------
def ref_normalize_answer(s):
    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_get_tokens(s):
    if not s:
        return []
    return ref_normalize_answer(s).split()


def ref_compute_exact(a_gold, a_pred):
    return int(ref_normalize_answer(a_gold) == ref_normalize_answer(a_pred))


def ref_compute_f1(a_gold, a_pred):
    gold_toks = ref_get_tokens(a_gold)
    pred_toks = ref_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def ref_make_qid_to_has_ans(dataset):
    return {qa["id"]: bool(qa["answers"]) for article in dataset for p in article["paragraphs"] for qa in p["qas"]}


def ref_get_raw_scores(dataset, preds):
    exact_scores, f1_scores = {}, {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                gold_answers = [a["text"] for a in qa["answers"] if ref_normalize_answer(a["text"])]
                if not gold_answers:
                    gold_answers = [""]
                if qid not in preds:
                    continue
                a_pred = preds[qid]
                exact_scores[qid] = max(ref_compute_exact(a, a_pred) for a in gold_answers)
                f1_scores[qid] = max(ref_compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def ref_apply_no_ans_threshold(scores, na_probs, qid_to_has_ans, na_prob_thresh):
    new_scores = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        new_scores[qid] = float(not qid_to_has_ans[qid]) if pred_na else s
    return new_scores


def ref_make_eval_dict(exact_scores, f1_scores, qid_list=None):
    if not qid_list:
        total = len(exact_scores)
        return collections.OrderedDict([
            ("exact", 100.0 * sum(exact_scores.values()) / total),
            ("f1", 100.0 * sum(f1_scores.values()) / total),
            ("total", total),
        ])
    total = len(qid_list)
    return collections.OrderedDict([
        ("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
        ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
        ("total", total),
    ])


def ref_merge_eval(main_eval, new_eval, prefix):
    for k in new_eval:
        main_eval["%s_%s" % (prefix, k)] = new_eval[k]


def ref_find_best_thresh(preds, scores, na_probs, qid_to_has_ans):
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def ref_main(dataset_json, preds, na_probs=None, na_prob_thresh=1.0):
    dataset = dataset_json["data"]
    given = na_probs is not None
    if not given:
        na_probs = {k: 0.0 for k in preds}
    qid_to_has_ans = ref_make_qid_to_has_ans(dataset)
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = ref_get_raw_scores(dataset, preds)
    exact_thresh = ref_apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    f1_thresh = ref_apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    out_eval = ref_make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        ref_merge_eval(out_eval, ref_make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids), "HasAns")
    if no_ans_qids:
        ref_merge_eval(out_eval, ref_make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids), "NoAns")
    if given:
        best_exact, exact_t = ref_find_best_thresh(preds, exact_raw, na_probs, qid_to_has_ans)
        best_f1, f1_t = ref_find_best_thresh(preds, f1_raw, na_probs, qid_to_has_ans)
        out_eval["best_exact"] = best_exact
        out_eval["best_exact_thresh"] = exact_t
        out_eval["best_f1"] = best_f1
        out_eval["best_f1_thresh"] = f1_t
    return out_eval


# ---- helpers ------------------------------------------------------------------------------------------------
def ex(qid, *answers):
    return {"id": qid, "answers": {"text": list(answers), "answer_start": [0] * len(answers)}}


def flatten(squad):
    return [
        {"id": qa["id"], "answers": {"text": [a["text"] for a in qa["answers"]],
                                     "answer_start": [a["answer_start"] for a in qa["answers"]]}}
        for article in squad["data"] for p in article["paragraphs"] for qa in p["qas"]
    ]


def random_prediction(rng, qa, context):
    roll = rng.random()
    if roll < 0.3:
        return ""
    if roll < 0.5 and qa["answers"]:
        return rng.choice(qa["answers"])["text"]
    if roll < 0.6 and qa["answers"]:
        # Same answer with noise the normalizer must see through.
        return "The " + rng.choice(qa["answers"])["text"].upper() + "!"
    if roll < 0.65:
        return rng.choice([" ", "the", "a.", "An"])  # normalizes to nothing
    words = context.split()
    i = rng.randrange(len(words))
    return " ".join(words[i : i + rng.randint(1, 5)])


# ---- normalization and per-question scores -------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat!", "cat"),
        ("  a  dog,   an apple ", "dog apple"),
        ("theater", "theater"),  # "the" only as a whole word
        ("the-end", "theend"),  # punctuation goes first, so no article is left to remove
        ("Rock 'n' Roll", "rock n roll"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected == ref_normalize_answer(raw)


def test_exact_and_f1_per_question():
    assert exact_score("the Eiffel Tower.", "Eiffel tower") == 1
    assert exact_score("Eiffel", "Eiffel Tower") == 0
    assert f1_score("Eiffel", "Eiffel Tower") == pytest.approx(2 / 3)
    assert f1_score("tower tower", "tower") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("", "") == 1.0
    assert f1_score("something", "") == 0.0
    assert f1_score("", "something") == 0.0
    assert f1_score("paris", "london") == 0.0


def test_unanswerable_right_and_wrong_and_several_golds():
    examples = [ex("q1"), ex("q2"), ex("q3", "Denver Broncos", "Broncos"), ex("q4", "1990")]
    preds = {"q1": "", "q2": "some span", "q3": "the Broncos", "q4": "in 1990 or so"}
    result = evaluate(examples, preds)
    assert list(result) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                            "NoAns_exact", "NoAns_f1", "NoAns_total"]
    # q1 right; q2 wrong; q3 exact against the second gold; q4 F1 2*(1/4*1)/(1/4+1) = 0.4.
    assert result["exact"] == pytest.approx(100 * 2 / 4)
    assert result["f1"] == pytest.approx(100 * (1 + 0 + 1 + 0.4) / 4)
    assert result["HasAns_exact"] == pytest.approx(50.0)
    assert result["NoAns_exact"] == pytest.approx(50.0)
    assert (result["total"], result["HasAns_total"], result["NoAns_total"]) == (4, 2, 2)


def test_only_answerable_questions_gives_no_noans_keys():
    result = evaluate([ex("q1", "x")], {"q1": "x"})
    assert list(result) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"]


def test_gold_that_normalizes_to_nothing_counts_as_no_answer_text():
    # Official: gold "the" is dropped, so only "" matches it; the question still counts as HasAns.
    result = evaluate([ex("q1", "the")], {"q1": ""})
    assert result["exact"] == 100.0 and result["HasAns_total"] == 1


def test_na_prob_thresh_turns_answers_into_no_answer():
    examples = [ex("q1"), ex("q2", "blue")]
    preds = {"q1": "wrong", "q2": "blue"}
    # q1's na_prob 0.9 exceeds 0.5, so it counts as "" (right); q2's 0.7 also exceeds it (wrong).
    result = evaluate(examples, preds, {"q1": 0.9, "q2": 0.7}, na_prob_thresh=0.5)
    assert result["exact"] == 50.0 and result["NoAns_exact"] == 100.0 and result["HasAns_exact"] == 0.0


def test_best_threshold_search_known_values():
    # Sorted by na_prob: a(0.1, has, right) b(0.2, no-ans, answered -> -1) c(0.3, has, right)
    # d(0.4, no-ans, "" -> 0) e(0.5, has, wrong).
    examples = [ex("a", "x"), ex("b"), ex("c", "y"), ex("d"), ex("e", "z")]
    preds = {"a": "x", "b": "oops", "c": "y", "d": "", "e": "w"}
    na_probs = {"e": 0.5, "d": 0.4, "c": 0.3, "b": 0.2, "a": 0.1}
    result = evaluate(examples, preds, na_probs)
    # Running score from 2 (no-ans count): a->3 (best, 0.1), b->2, c->3 (not strictly better), d->3, e->3.
    assert result["best_exact"] == pytest.approx(100 * 3 / 5)
    assert result["best_exact_thresh"] == 0.1
    assert list(result)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    assert result == ref_main({"data": _as_articles(examples)}, preds, na_probs)


def test_best_threshold_stays_zero_when_nothing_helps():
    examples = [ex("a"), ex("b", "x")]
    result = evaluate(examples, {"a": "junk", "b": "wrong"}, {"a": 0.2, "b": 0.7})
    assert result["best_exact_thresh"] == 0.0 and result["best_exact"] == 50.0


def test_threshold_keeps_the_raw_json_value():
    # An integer na_prob is reported as the integer, as the official script prints it.
    result = evaluate([ex("a", "x")], {"a": "x"}, {"a": 3})
    assert result["best_exact_thresh"] == 3 and isinstance(result["best_exact_thresh"], int)


def test_missing_prediction_is_an_error_like_the_official_crash():
    with pytest.raises(HpmlError, match="1 of 2 questions have no prediction .first: q2"):
        evaluate([ex("q1"), ex("q2", "x")], {"q1": ""})
    with pytest.raises(HpmlError, match="no na_prob"):
        evaluate([ex("q1")], {"q1": ""}, {})


def _as_articles(examples):
    qas = [{"id": e["id"], "question": "?", "answers": [{"text": t, "answer_start": 0} for t in e["answers"]["text"]]}
           for e in examples]
    return [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]


# ---- agreement with the reference on generated data ---------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_official_logic_on_random_predictions(seed):
    rng = random.Random(seed)
    squad = make_squad(300, seed, split="dev")
    preds, na_probs = {}, {}
    for article in squad["data"]:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                preds[qa["id"]] = random_prediction(rng, qa, p["context"])
                # Coarse values so that ties occur and the tie walk is exercised.
                na_probs[qa["id"]] = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()])
    preds["not-a-question"] = "extra predictions are ignored"
    examples = flatten(squad)
    for thresh in (1.0, 0.5, 0.0):
        ours = evaluate(examples, preds, na_probs, na_prob_thresh=thresh)
        ref = ref_main(squad, preds, na_probs, na_prob_thresh=thresh)
        assert list(ours) == list(ref)
        for key in ref:
            assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert list(evaluate(examples, preds)) == list(ref_main(squad, preds))
    assert evaluate(examples, preds) == pytest.approx(dict(ref_main(squad, preds)), abs=1e-6)


# ---- files --------------------------------------------------------------------------------------------------
def test_score_files_prints_what_the_official_script_prints(tmp_path):
    squad = make_squad(40, 7, split="dev")
    rng = random.Random(7)
    preds = {qa["id"]: random_prediction(rng, qa, p["context"])
             for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]}
    na_probs = {k: rng.random() for k in preds}
    for name, obj in (("dev.json", squad), ("preds.json", preds), ("na.json", na_probs)):
        (tmp_path / name).write_text(json.dumps(obj))
    printed = json.dumps(score_files(str(tmp_path / "dev.json"), str(tmp_path / "preds.json"),
                                     str(tmp_path / "na.json")), indent=2)
    assert printed == json.dumps(ref_main(squad, preds, na_probs), indent=2)
    assert "best_f1_thresh" not in score_files(str(tmp_path / "dev.json"), str(tmp_path / "preds.json"))


def test_score_files_errors_name_the_file(tmp_path):
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(make_squad(5, 0)))
    bad = tmp_path / "preds.json"
    bad.write_text("{not json")
    with pytest.raises(HpmlError, match=r"preds\.json: not valid JSON"):
        score_files(str(dev), str(bad))
    with pytest.raises(HpmlError, match=r"nope\.json: no such"):
        score_files(str(dev), str(tmp_path / "nope.json"))
    bad.write_text(json.dumps({"x": 1}))
    with pytest.raises(HpmlError, match=r"preds\.json: the value for question x"):
        score_files(str(dev), str(bad))
    bad.write_text(json.dumps({}))
    with pytest.raises(HpmlError, match=r"preds\.json: 5 of 5 questions have no prediction") as caught:
        score_files(str(dev), str(bad))
    assert "\n" not in str(caught.value)
