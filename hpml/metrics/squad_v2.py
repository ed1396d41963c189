"""SQuAD v2.0 exact match and F1, defined exactly as the official evaluate-v2.0.py defines them."""
from __future__ import annotations

import collections
import re
import string
from typing import Any, Iterable, Mapping, Optional

from hpml.errors import HpmlError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the as whole words, collapse whitespace."""
    # The official order matters: punctuation goes before articles, so "the-end" becomes "theend", not "end".
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_score(pred: str, gold: str) -> int:
    """1 if the normalized strings are equal, else 0."""
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1_score(pred: str, gold: str) -> float:
    """Bag-of-tokens F1 of the normalized strings; an empty side scores 1 only if both are empty."""
    gold_toks = _tokens(gold)
    pred_toks = _tokens(pred)
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _has_answer(example: Mapping[str, Any]) -> bool:
    # Like the official script: "answerable" means the answer list is non-empty, before normalization.
    return bool(example["answers"]["text"])


def _raw_scores(
    examples: Iterable[Mapping[str, Any]], preds: Mapping[str, str]
) -> tuple[dict[str, int], dict[str, float], list[str]]:
    exact: dict[str, int] = {}
    f1: dict[str, float] = {}
    missing: list[str] = []
    for ex in examples:
        qid = ex["id"]
        # Gold answers that normalize to nothing (e.g. "the") are dropped, so only "" can match them.
        golds = [a for a in ex["answers"]["text"] if normalize_answer(a)] or [""]
        if qid not in preds:
            missing.append(qid)
            continue
        pred = preds[qid]
        exact[qid] = max(exact_score(pred, g) for g in golds)
        f1[qid] = max(f1_score(pred, g) for g in golds)
    return exact, f1, missing


def _apply_threshold(
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    has_ans: Mapping[str, bool],
    thresh: float,
) -> dict[str, float]:
    # A question whose na_prob exceeds the threshold counts as answered "": right iff it has no answer.
    return {
        qid: float(not has_ans[qid]) if na_probs[qid] > thresh else s for qid, s in scores.items()
    }


def _summary(exact: Mapping[str, float], f1: Mapping[str, float], qids: list[str]) -> dict[str, Any]:
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact[q] for q in qids) / total,
        "f1": 100.0 * sum(f1[q] for q in qids) / total,
        "total": total,
    }


def _best_thresh(
    preds: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    has_ans: Mapping[str, bool],
) -> tuple[float, Any]:
    # Sweep the threshold upward through the sorted na_probs: start from "every question answered ''"
    # (all no-answer questions right) and let questions become answered one by one. Ties are walked one
    # question at a time in na_probs order, exactly like the official script, so the reported threshold is
    # the raw na_prob value of the question at which the running score last strictly improved (0.0 if never).
    cur = sum(1 for v in has_ans.values() if not v)
    best, best_thresh = cur, 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            cur += scores[qid]
        elif preds[qid]:
            # Raw truthiness, as official: a prediction of " " still counts as an answer here.
            cur -= 1
        if cur > best:
            best, best_thresh = cur, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def evaluate(
    examples: Iterable[Mapping[str, Any]],
    preds: Mapping[str, str],
    na_probs: Optional[Mapping[str, float]] = None,
    na_prob_thresh: float = 1.0,
    *,
    preds_name: str = "predictions",
    na_probs_name: str = "na_probs",
) -> dict[str, Any]:
    """The official evaluator's output dict, in its key order, for flat examples and {id: text} predictions.

    `examples`: dicts with `id` and `answers` {"text": [...], ...}; an empty text list is unanswerable.
    `na_probs`: {id: score}, higher = more likely unanswerable; adds the best-threshold keys.
    `preds_name`, `na_probs_name`: how error messages name the two inputs (score_files passes the paths).

    Missing predictions: the official script prints "Missing prediction for <id>", skips the question in the
    raw scores, and then fails with a KeyError when it builds the HasAns/NoAns split (every question is in
    one of them), so it never reports a score with a missing prediction. We raise HpmlError instead of
    inventing a score it would not give. Predictions for ids not in `examples` are ignored, as official.
    """
    examples = list(examples)
    if not examples:
        raise HpmlError("evaluate: no questions to score; pass at least one example")
    has_ans = {ex["id"]: _has_answer(ex) for ex in examples}
    exact_raw, f1_raw, missing = _raw_scores(examples, preds)
    if missing:
        raise HpmlError(
            f"{preds_name}: {len(missing)} of {len(has_ans)} questions have no prediction "
            f"(first: {missing[0]}); predict every question, with \"\" for no answer"
        )
    given_na_probs = na_probs is not None
    if na_probs is None:
        na_probs = {k: 0.0 for k in preds}
    else:
        absent = [q for q in exact_raw if q not in na_probs]
        if absent:
            raise HpmlError(
                f"{na_probs_name}: {len(absent)} questions have no na_prob (first: {absent[0]}); "
                "give one number per predicted question"
            )
    exact = _apply_threshold(exact_raw, na_probs, has_ans, na_prob_thresh)
    f1 = _apply_threshold(f1_raw, na_probs, has_ans, na_prob_thresh)

    result = _summary(exact, f1, list(exact))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, v in has_ans.items() if v is wanted]
        if qids:
            for key, value in _summary(exact, f1, qids).items():
                result[f"{prefix}_{key}"] = value
    if given_na_probs:
        result["best_exact"], result["best_exact_thresh"] = _best_thresh(preds, exact_raw, na_probs, has_ans)
        result["best_f1"], result["best_f1_thresh"] = _best_thresh(preds, f1_raw, na_probs, has_ans)
    return result


def _read_id_map(path: str, what: str, value_types: tuple[type, ...]) -> dict[str, Any]:
    from hpml.data import read_json

    data = read_json(path, f"the {what}", "check the path")
    if not isinstance(data, dict):
        raise HpmlError(f"{path}: expected a JSON object {{question id: value}}, got {type(data).__name__}")
    for qid, value in data.items():
        # bool is an int subclass; a true/false na_prob is almost surely a mistake.
        if not isinstance(value, value_types) or isinstance(value, bool):
            raise HpmlError(
                f"{path}: the value for question {qid} is {value!r}; each {what} value must be "
                f"{' or '.join(t.__name__ for t in value_types)}"
            )
    return data


def score_files(
    data_json_path: str, preds_json_path: str, na_probs_json_path: Optional[str] = None
) -> dict[str, Any]:
    """Score official-format files: the same dict the official script prints (default na_prob_thresh 1.0)."""
    from hpml.data.squad import load_squad_json  # the one reader of the official data format

    # The official script does not check answer_start, so neither does scoring: any file it scores, we score.
    examples = load_squad_json(data_json_path, check_spans=False)
    preds = _read_id_map(preds_json_path, "predictions", (str,))
    na_probs = None
    if na_probs_json_path:
        na_probs = _read_id_map(na_probs_json_path, "na_probs", (int, float))
    return evaluate(
        examples, preds, na_probs, preds_name=preds_json_path, na_probs_name=na_probs_json_path or "na_probs"
    )
