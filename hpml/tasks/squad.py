"""SQuAD v2 as a task spec: windows over long contexts, span postprocessing, official-equivalent EM/F1."""
from __future__ import annotations

import os

from hpml.config import SQUAD_PARAMS
from hpml.errors import HpmlError
from hpml.tasks import Evaluation, Prepared, TaskSpec, data_fingerprint, load_revision

HUB = "rajpurkar/squad_v2"
FILES = ("train-v2.0.json", "dev-v2.0.json")
BOOKKEEPING = ("example_id", "offset_mapping")  # eval feature columns postprocessing needs, the model must not see


def fingerprint(cfg, revision=None) -> str:
    revision = revision or load_revision(cfg.data_dir, HUB)
    return data_fingerprint(cfg.data_dir, [os.path.join(cfg.data_dir, f) for f in FILES], HUB, revision,
                            {"max_train_samples": cfg.max_train_samples, "max_eval_samples": cfg.max_eval_samples})


def prepare(cfg, tokenizer, cache_dir: str) -> Prepared:
    from hpml.data import squad

    revision = load_revision(cfg.data_dir, HUB)
    train = squad.load_squad(cfg.data_dir, "train", revision)
    dev = squad.load_squad(cfg.data_dir, "validation", revision)
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train = train.select(range(cfg.max_train_samples))
    if cfg.max_eval_samples and cfg.max_eval_samples < len(dev):
        dev = dev.select(range(cfg.max_eval_samples))
    fp = fingerprint(cfg, revision)
    tok_name = getattr(tokenizer, "name_or_path", "tok")
    feats = {}
    for kind, ds, fn, file, limit in (
            ("train", train, squad.prepare_train_features, FILES[0], "max_train_samples"),
            ("eval", dev, squad.prepare_eval_features, FILES[1], "max_eval_samples")):
        # each split's features are keyed by that split alone: a new max_eval_samples must not tokenize
        # the whole training set again (the run's data fingerprint covers both)
        split_fp = data_fingerprint(cfg.data_dir, [os.path.join(cfg.data_dir, file)], HUB, revision,
                                    {limit: getattr(cfg, limit)})
        key = squad.feature_cache_key(split_fp, tok_name, cfg.max_length, cfg.doc_stride, kind)
        feats[kind] = squad.tokenize_cached(
            ds, lambda b, fn=fn: fn(b, tokenizer, cfg.max_length, cfg.doc_stride), cache_dir, key,
            remove_columns=ds.column_names)
    train_feats = feats["train"].map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True)
    return Prepared(train_feats, dev, feats["eval"], fp)


def eval_inputs(prep: Prepared):
    return prep.eval_features.remove_columns(list(BOOKKEEPING))


def evaluate(predictions, prep: Prepared, cfg) -> Evaluation:
    """Start/end logits of every eval window → answers, null odds and the official evaluator's scores.

    The evaluator turns a question into "no answer" when its na_prob exceeds 1.0 (its default threshold).
    null_odds.json therefore holds the null odds relative to the run's null_threshold (null score - best
    span score - null_threshold): positive exactly where predictions.json says "", so that override never
    contradicts the predictions, and `hpml score` on the two files reproduces the logged numbers for every
    threshold. At the default threshold 0 these are the plain null odds of the HF example.
    """
    from hpml.data import squad
    from hpml.metrics import squad_v2

    start_logits, end_logits = predictions[:2]
    result = squad.postprocess_predictions(prep.eval_examples, prep.eval_features, start_logits, end_logits,
                                           n_best=cfg.n_best, max_answer_length=cfg.max_answer_length,
                                           null_threshold=cfg.null_threshold)
    na_probs = {qid: odds - cfg.null_threshold for qid, odds in result.null_odds.items()}
    scores = squad_v2.evaluate(list(prep.eval_examples), result.predictions, na_probs=na_probs)
    return Evaluation({f"eval_{k}": v for k, v in scores.items()},
                      {"predictions.json": result.predictions, "null_odds.json": na_probs})


def export_settings(cfg) -> dict:
    return {"max_length": cfg.max_length, "doc_stride": cfg.doc_stride, "n_best": cfg.n_best,
            "max_answer_length": cfg.max_answer_length, "null_threshold": cfg.null_threshold}


def check_rows(frame) -> None:
    # An empty passage has no span to score (score -inf, which is not valid JSON in a response).
    for i, value in enumerate(frame["context"]):
        if not value.strip():
            raise HpmlError(f"input row {i + 1}: 'context' is empty: pass the passage to answer from")


def predict(loaded, frame, batch_size: int = 32) -> list[dict]:
    """Windows, postprocessing and null rule exactly as in evaluation (same functions, same settings)."""
    from hpml.data import squad
    from hpml.data.batching import Collator
    from hpml.variants import Batching

    questions, contexts = list(frame["question"]), list(frame["context"])
    m = loaded.meta
    ids = [str(i) for i in range(len(questions))]

    def windows(q: list[str], c: list[str], i: list[str]):
        return squad.prepare_eval_features({"id": i, "question": q, "context": c}, loaded.tokenizer,
                                           m["max_length"], m["doc_stride"])

    try:
        enc = windows(questions, contexts, ids)
    except Exception as exc:  # the tokenizers library raises a bare Exception
        if "Truncation error" not in str(exc):
            raise
        for i, (q, c) in enumerate(zip(questions, contexts)):
            try:
                windows([q], [c], [ids[i]])
            except Exception:
                raise HpmlError(f"input row {i + 1}: the question leaves no room for the passage in this model's "
                                f"{m['max_length']}-token windows ({m['doc_stride']} tokens overlap): "
                                "shorten it") from None
        raise
    model_keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    features = [{k: enc[k][j] for k in model_keys + list(BOOKKEEPING)} for j in range(len(enc["input_ids"]))]
    # Padding to the batch's longest window: attention masks make the logits those of evaluation's padding.
    collate = Collator(loaded.tokenizer.pad_token_id, m["max_length"], Batching(padding="longest"))
    starts, ends = [], []
    for i in range(0, len(features), batch_size):
        res = loaded.forward(collate([{k: f[k] for k in model_keys} for f in features[i:i + batch_size]]))
        starts += list(res.start_logits.float().cpu().numpy())
        ends += list(res.end_logits.float().cpu().numpy())
    examples = [{"id": i, "context": c} for i, c in zip(ids, contexts)]
    result = squad.postprocess_predictions(examples, features, starts, ends, n_best=m["n_best"],
                                           max_answer_length=m["max_answer_length"],
                                           null_threshold=m["null_threshold"])
    by_id = {r["id"]: r for r in result.rows}
    return [{k: by_id[i][k] for k in ("answer", "score", "null_score")} for i in ids]


def make_data(out_dir: str, n_train: int, n_dev: int, seed: int):
    from hpml.data import synthetic

    return synthetic.write_squad(out_dir, n_train, n_dev, seed)


SPEC = TaskSpec(
    name="squad", title="SQuAD v2", auto_class="AutoModelForQuestionAnswering", num_labels=None,
    head_module="qa_outputs", peft_task_type="QUESTION_ANS", params=tuple(SQUAD_PARAMS),
    headline="eval_f1", shown=("eval_exact", "eval_f1", "eval_HasAns_f1", "eval_NoAns_f1"),
    input_columns=("question", "context"),
    output_columns=(("answer", "string"), ("score", "double"), ("null_score", "double")),
    prepare=prepare, eval_inputs=eval_inputs, evaluate=evaluate,
    epoch_metrics=None,  # scored once, after training: postprocessing needs every window of a question
    export_settings=export_settings, predict=predict, check_rows=check_rows, make_data=make_data,
    make_data_sizes=(2000, 500), fingerprint=fingerprint, hub_repo=HUB, hub_config=None,
    files={"train": FILES[0], "validation": FILES[1]}, default_experiment="hpml-squad",
)
