"""SQuAD v2 data: reading official JSON or the hub, tokenized windows with labels, and span postprocessing."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np

from hpml.data import read_json
from hpml.errors import HpmlError

HUB_DATASET = "rajpurkar/squad_v2"
SPLIT_FILES = {"train": "train-v2.0.json", "validation": "dev-v2.0.json"}
CLS_INDEX = 0  # question-first BERT inputs start with [CLS]; it is the "no answer" position

# Bump when the feature functions change, so cached features made by older code are not reused.
FEATURE_VERSION = 1


def _squad_features():
    import datasets

    # Same columns and types as the hub's rajpurkar/squad_v2, so local files and the hub are interchangeable.
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answers": {
                "text": datasets.List(datasets.Value("string")),
                "answer_start": datasets.List(datasets.Value("int32")),
            },
        }
    )


# ---- reading ---------------------------------------------------------------------------------------------
def _need(obj: Any, key: str, kind: type, path: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise HpmlError(f"{path}: {where} has no \"{key}\"; the file must follow the SQuAD v2.0 JSON format")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HpmlError(
            f"{path}: {where}: \"{key}\" is a {type(value).__name__}, expected {kind.__name__}; "
            "the file must follow the SQuAD v2.0 JSON format"
        )
    return value


def load_squad_json(path: str, *, check_spans: bool = True) -> list[dict[str, Any]]:
    """Flatten an official SQuAD v2.0 JSON file into {id, title, context, question, answers} records.

    Unanswerable questions get empty answer lists (their `plausible_answers` are not kept). With
    `check_spans`, every answer must equal context[answer_start:answer_start + len(text)]; scoring turns the
    check off because the official evaluator never looks at answer_start.
    """
    raw = read_json(path, "a SQuAD v2.0 dataset",
                    f"pass a directory holding {' and '.join(SPLIT_FILES.values())}")

    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for a, article in enumerate(_need(raw, "data", list, path, "the top level")):
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, para in enumerate(_need(article, "paragraphs", list, path, f"article {a}")):
            where = f"article {a} paragraph {p}"
            context = _need(para, "context", str, path, where)
            for q, qa in enumerate(_need(para, "qas", list, path, where)):
                qid = _need(qa, "id", str, path, f"{where} question {q}")
                if qid in seen:  # scoring keys by id: a repeat would silently be scored as one question
                    raise HpmlError(f"{path}: question id {qid!r} appears twice; give every question a unique id")
                seen.add(qid)
                where_q = f"question {qid}"
                question = _need(qa, "question", str, path, where_q)
                texts, starts = [], []
                for ans in _need(qa, "answers", list, path, where_q):
                    text = _need(ans, "text", str, path, f"{where_q} answer")
                    start = _need(ans, "answer_start", int, path, f"{where_q} answer")
                    if check_spans and context[start : start + len(text)] != text:
                        raise HpmlError(
                            f"{path}: question {qid}: answer {text!r} is not at answer_start {start} of its "
                            f"context (found {context[start:start + len(text)]!r}); fix answer_start"
                        )
                    texts.append(text)
                    starts.append(start)
                if qa.get("is_impossible") is True and texts:
                    raise HpmlError(
                        f"{path}: question {qid} is marked is_impossible but has answers; "
                        "move them to plausible_answers or set is_impossible to false"
                    )
                records.append(
                    {
                        "id": qid,
                        "title": str(title),
                        "context": context,
                        "question": question,
                        "answers": {"text": texts, "answer_start": starts},
                    }
                )
    if not records:
        raise HpmlError(f"{path}: the file holds no questions; give a SQuAD v2.0 file with at least one")
    return records


def load_squad(data_dir: Optional[str], split: Literal["train", "validation"], revision: Optional[str] = None):
    """The split as a datasets.Dataset: the hub's rajpurkar/squad_v2 (at `revision`, a commit, when given) when
    data_dir is empty, else local files."""
    import datasets

    if split not in SPLIT_FILES:
        raise HpmlError(f"split {split!r} is not one of {sorted(SPLIT_FILES)}; pass train or validation")
    if not data_dir:
        try:
            return datasets.load_dataset(HUB_DATASET, split=split, revision=revision)
        except Exception as e:  # network, auth, missing cache: all end the same way for the user
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise HpmlError(
                f"cannot load {HUB_DATASET} from the Hugging Face hub ({first_line}); pass data_dir, a "
                f"directory with {SPLIT_FILES['train']} and {SPLIT_FILES['validation']}"
            ) from None
    path = os.path.join(data_dir, SPLIT_FILES[split])
    return datasets.Dataset.from_list(load_squad_json(path), features=_squad_features())


# ---- features --------------------------------------------------------------------------------------------
def check_overflow_windows(tokenizer, max_length: int, doc_stride: int) -> None:
    """Fail loudly if the tokenizer's stride windows do not reach the end of a long context.

    tokenizers 0.23.1 and 0.23.2 stop tokenizing a truncated input early, so the overflow windows of a long
    context cover only its beginning (huggingface/tokenizers#2091): with transformers 5.17 a 2,750-character
    context gave 2 windows ending at character 848 instead of 6 reaching its end. Training and evaluation
    would silently lose every answer past the second window. The probe (a few milliseconds) runs once per
    tokenizer object and window shape.
    """
    if (id(tokenizer), max_length, doc_stride) in _CHECKED:
        return
    context = " ".join(f"word{i}" for i in range(4 * max_length))
    enc = tokenizer(["probe question"], [context], truncation="only_second", max_length=max_length,
                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    reached = max(off[1] for i, offsets in enumerate(enc["offset_mapping"])
                  for off, seq in zip(offsets, enc.sequence_ids(i)) if seq == 1)
    if reached != len(context):
        import tokenizers

        raise HpmlError(f"tokenizers {tokenizers.__version__} drops the stride windows of long contexts (the "
                        f"windows reach character {reached} of {len(context)}; huggingface/tokenizers#2091): "
                        "install another release, e.g. pip install 'tokenizers>=0.23.3'")
    _CHECKED.add((id(tokenizer), max_length, doc_stride))


_CHECKED: set[tuple[int, int, int]] = set()


def _windows(examples: Mapping[str, list], tokenizer, max_length: int, doc_stride: int):
    if not 0 <= doc_stride < max_length:
        raise ValueError(f"doc_stride {doc_stride} must be in [0, max_length={max_length})")
    check_overflow_windows(tokenizer, max_length, doc_stride)
    # Some SQuAD questions start with long runs of spaces, which waste window room.
    questions = [q.lstrip() for q in examples["question"]]
    # No padding here: the collator pads each batch (to max_length or to its longest row).
    return tokenizer(
        questions,
        examples["context"],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )


def _context_range(sequence_ids: list[Optional[int]]) -> tuple[int, int]:
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    return first, last


def prepare_train_features(examples: Mapping[str, list], tokenizer, max_length: int = 384, doc_stride: int = 128):
    """Batched map function: question+context windows, unpadded, with start/end token labels.

    A context longer than one window is split into windows overlapping by `doc_stride` tokens. A window that
    does not contain the whole answer, and every window of an unanswerable question, is labeled CLS (0).
    """
    enc = _windows(examples, tokenizer, max_length, doc_stride)
    sample_of = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offsets_all):
        answers = examples["answers"][sample_of[i]]
        if not answers["text"]:
            starts.append(CLS_INDEX)
            ends.append(CLS_INDEX)
            continue
        # Training data has one answer per question; with several (dev files) the first one is the label.
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        first, last = _context_range(enc.sequence_ids(i))
        if offsets[first][0] > start_char or offsets[last][1] < end_char:
            starts.append(CLS_INDEX)
            ends.append(CLS_INDEX)
            continue
        # The answer lies inside this window: take the last token starting at or before the answer's first
        # character and the first token ending at or after its last character.
        tok_start = first
        while tok_start < last and offsets[tok_start + 1][0] <= start_char:
            tok_start += 1
        tok_end = last
        while tok_end > tok_start and offsets[tok_end - 1][1] >= end_char:
            tok_end -= 1
        starts.append(tok_start)
        ends.append(tok_end)
    enc["start_positions"] = starts
    enc["end_positions"] = ends
    return enc


def prepare_eval_features(examples: Mapping[str, list], tokenizer, max_length: int = 384, doc_stride: int = 128):
    """Batched map function: the same windows as training, with `example_id` and `offset_mapping`.

    `offset_mapping` holds [start_char, end_char] for context tokens and None for question, special and
    padding tokens (Arrow stores None in a list of lists without trouble), so postprocessing can tell
    context tokens apart. Both columns must be dropped before a batch reaches the model.
    """
    enc = _windows(examples, tokenizer, max_length, doc_stride)
    sample_of = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc["offset_mapping"]
    enc["example_id"] = [examples["id"][s] for s in sample_of]
    enc["offset_mapping"] = [
        [list(o) if seq == 1 else None for o, seq in zip(offsets, enc.sequence_ids(i))]
        for i, offsets in enumerate(offsets_all)
    ]
    return enc


def feature_cache_key(
    data_fingerprint: str,
    tokenizer_name: str,
    max_length: int,
    doc_stride: int,
    kind: Literal["train", "eval"],
) -> str:
    """A file-name-safe key for cached features: changes when the data, tokenizer, window, code or the
    tokenizers release change."""
    import tokenizers  # windows depend on its version (see check_overflow_windows)

    parts = [f"v{FEATURE_VERSION}", data_fingerprint, tokenizer_name, str(max_length), str(doc_stride), kind,
             tokenizers.__version__]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]
    return f"squad-{kind}-{digest}"


def tokenize_cached(dataset, fn: Callable, cache_dir: str, key: str, remove_columns: Sequence[str]):
    """dataset.map(fn, batched=True) stored as cache_dir/<key>.arrow; a later call with the same key loads it."""
    os.makedirs(cache_dir, exist_ok=True)
    # new_fingerprint=key: datasets would otherwise hash `fn` and the tokenizer it closes over, which is slow
    # and, for some tokenizers, not stable between processes.
    return dataset.map(
        fn,
        batched=True,
        remove_columns=list(remove_columns),
        cache_file_name=os.path.join(cache_dir, f"{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc=f"tokenizing ({key})",
    )


# ---- postprocessing --------------------------------------------------------------------------------------
@dataclass
class PostprocessResult:
    """Per question: the answer text ("" = no answer), null odds for the evaluator, and the scores behind it."""

    predictions: dict[str, str] = field(default_factory=dict)
    null_odds: dict[str, float] = field(default_factory=dict)  # null score - best span score
    rows: list[dict[str, Any]] = field(default_factory=list)  # {id, answer, score, null_score}


def _column(rows, name: str) -> list:
    if isinstance(rows, (list, tuple)):
        return [r[name] for r in rows]
    return list(rows[name])  # a datasets.Dataset column


def _argmax_span(start, end, in_context, starts, ends, max_answer_length):
    s = starts[:, None]
    e = ends[None, :]
    ok = in_context[s] & in_context[e] & (e >= s) & (e - s + 1 <= max_answer_length)
    if not ok.any():
        return None
    scores = np.where(ok, start[s] + end[e], -np.inf)
    # argmax takes the first maximum in (start rank, end rank) order, as a nested loop would.
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return float(scores[i, j]), int(starts[i]), int(ends[j])


def _best_span(
    start: np.ndarray,
    end: np.ndarray,
    offsets: Sequence[Optional[Sequence[int]]],
    n_best: int,
    max_answer_length: int,
) -> Optional[tuple[float, int, int]]:
    """(score, start_char, end_char) of the best span among the top-n starts and ends, or None."""
    in_context = np.array([o is not None for o in offsets])
    # A stable sort keeps equal logits in position order, so the result does not depend on the sort.
    top_starts = np.argsort(-start, kind="stable")[:n_best]
    top_ends = np.argsort(-end, kind="stable")[:n_best]
    best = _argmax_span(start, end, in_context, top_starts, top_ends, max_answer_length)
    if best is None and in_context.any():
        # Rare (every top logit outside the context or in the wrong order): search all context tokens so a
        # window with context always offers a span; costs a len x len score matrix once.
        every = np.flatnonzero(in_context)
        best = _argmax_span(start, end, in_context, every, every, max_answer_length)
    if best is None:
        return None
    score, s, e = best
    return score, offsets[s][0], offsets[e][1]


def postprocess_predictions(
    examples,
    features,
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_length: int = 30,
    null_threshold: float = 0.0,
) -> PostprocessResult:
    """Turn per-window start/end logits into one answer per question (HF question-answering semantics).

    `examples`: rows with `id` and `context`; `features`: rows with `example_id` and `offset_mapping` (from
    prepare_eval_features), in the same order as the logits. `start_logits`/`end_logits`: one 1-D array per
    feature, or a 2-D array; positions past the feature's length (batch padding) are ignored.

    Per question, over all its windows: best span score = max of start+end logit over candidate spans (top
    `n_best` starts x top `n_best` ends, inside the context, end >= start, at most `max_answer_length` tokens);
    null score = the minimum over windows of start_logit[CLS] + end_logit[CLS]. The answer is "" when
    null_score - best_span_score > null_threshold (HF's null_score_diff_threshold), else the best span's
    exact context substring. A question with no possible span (empty context) gets "", score -inf and
    null odds +inf.
    """
    contexts = dict(zip(_column(examples, "id"), _column(examples, "context")))
    feature_ids = _column(features, "example_id")
    offsets_all = _column(features, "offset_mapping")
    if len(start_logits) != len(feature_ids) or len(end_logits) != len(feature_ids):
        raise ValueError(
            f"{len(feature_ids)} features but {len(start_logits)} start and {len(end_logits)} end logit rows"
        )

    best: dict[str, Optional[tuple[float, int, int]]] = {}
    null: dict[str, float] = {}
    for i, qid in enumerate(feature_ids):
        offsets = offsets_all[i]
        n = len(offsets)
        start = np.asarray(start_logits[i], dtype=np.float64)[:n]
        end = np.asarray(end_logits[i], dtype=np.float64)[:n]
        null_i = float(start[CLS_INDEX] + end[CLS_INDEX])
        null[qid] = min(null.get(qid, null_i), null_i)
        span = _best_span(start, end, offsets, n_best, max_answer_length)
        if span is not None and (best.get(qid) is None or span[0] > best[qid][0]):
            best[qid] = span
        else:
            best.setdefault(qid, None)

    result = PostprocessResult()
    for qid, context in contexts.items():
        if qid not in null:
            raise ValueError(f"question {qid} has no features; postprocess the features made from these examples")
        span = best[qid]
        if span is None:
            score, answer = float("-inf"), ""
        else:
            score, start_char, end_char = span
            answer = context[start_char:end_char]
        odds = null[qid] - score
        if odds > null_threshold:
            answer = ""
        result.predictions[qid] = answer
        result.null_odds[qid] = odds
        result.rows.append({"id": qid, "answer": answer, "score": score, "null_score": null[qid]})
    return result
