"""Sequence classification tasks (single sentences or pairs) as specs: one builder, one module per task."""
from __future__ import annotations

import hashlib
import os
from typing import Callable

import numpy as np

from hpml.config import Param
from hpml.tasks import Evaluation, Prepared, TaskSpec, data_fingerprint, load_revision

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def evaluate(predictions, prep: Prepared, cfg) -> Evaluation:
    """Logits → accuracy (fraction) and one {label, probability} row per example (predictions.json)."""
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    probs = softmax(logits)
    labels = np.asarray(prep.eval_features["labels"])
    rows = [{"label": int(p.argmax()), "probability": float(p.max())} for p in probs]
    return Evaluation({"eval_accuracy": float((probs.argmax(-1) == labels).mean())}, {"predictions.json": rows})


def epoch_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def tokenize(ds, tokenizer, max_length: int, text_columns: tuple[str, ...]):
    """Unpadded features (the collator pads per batch) with labels and a `length` column for length grouping."""

    def fn(batch):
        enc = tokenizer(*[batch[c] for c in text_columns], truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    # An explicit fingerprint: without one, datasets hashes `fn` (a closure over the tokenizer) inside a bare
    # `except`, which swallowed a Ctrl-C pressed during tokenization and the run went on.
    key = (f"{ds._fingerprint}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer) if hasattr(tokenizer, '__len__') else ''}|{max_length}|"
           f"{','.join(text_columns)}|classification-v1")
    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenizing",
                  new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])


def classification_spec(*, name: str, title: str, labels: int, params: list[Param], data_columns: tuple[str, ...],
                        input_columns: tuple[str, ...], load: Callable, files: tuple[str, str], hub: str,
                        hub_repo: str, make_data: Callable, make_data_sizes: tuple[int, int]) -> TaskSpec:
    """A spec for GLUE-style classification: `load(data_dir, split, max_samples, revision)` gives a Dataset with
    `data_columns` (the text, one or two columns) and `label`; requests carry `input_columns` in that order."""

    def fingerprint(cfg, revision=None) -> str:
        revision = revision or load_revision(cfg.data_dir, hub_repo)
        return data_fingerprint(cfg.data_dir, [os.path.join(cfg.data_dir, f) for f in files], hub, revision,
                                {"max_train_samples": cfg.max_train_samples,
                                 "max_eval_samples": cfg.max_eval_samples})

    def prepare(cfg, tokenizer, cache_dir: str) -> Prepared:
        revision = load_revision(cfg.data_dir, hub_repo)
        train = load(cfg.data_dir, "train", cfg.max_train_samples, revision)
        dev = load(cfg.data_dir, "validation", cfg.max_eval_samples, revision)
        fp = fingerprint(cfg, revision)
        return Prepared(tokenize(train, tokenizer, cfg.max_length, data_columns), dev,
                        tokenize(dev, tokenizer, cfg.max_length, data_columns), fp)

    def eval_inputs(prep: Prepared):
        return prep.eval_features

    def export_settings(cfg) -> dict:
        return {"max_length": cfg.max_length}

    def check_rows(frame) -> None:
        return None  # any strings classify; check_input has checked they are strings

    def predict(loaded, frame, batch_size: int = 32) -> list[dict]:
        """Batches of rows of similar length (sorted, answers put back in request order): a large request pads
        each batch to its own longest row, not to the request's."""
        texts = [list(frame[c]) for c in input_columns]
        order = sorted(range(len(texts[0])), key=lambda i: sum(len(t[i]) for t in texts))
        out: list[dict] = [{}] * len(order)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = loaded.tokenizer(*[[t[i] for i in idx] for t in texts], truncation=True,
                                   max_length=loaded.meta.get("max_length", 128), padding=True, return_tensors="pt")
            probs = softmax(loaded.forward(dict(enc)).logits.float().cpu().numpy())
            for i, p in zip(idx, probs):
                out[i] = {"label": int(p.argmax()), "probability": float(p.max())}
        return out

    return TaskSpec(
        name=name, title=title, auto_class="AutoModelForSequenceClassification", num_labels=labels,
        head_module="classifier", peft_task_type="SEQ_CLS", params=tuple(params), headline="eval_accuracy",
        shown=("eval_accuracy",), input_columns=input_columns,
        output_columns=(("label", "long"), ("probability", "double")),
        prepare=prepare, eval_inputs=eval_inputs, evaluate=evaluate, epoch_metrics=epoch_metrics,
        export_settings=export_settings, predict=predict, check_rows=check_rows, make_data=make_data,
        make_data_sizes=make_data_sizes, fingerprint=fingerprint, hub_repo=hub_repo,
        hub_config=hub.rsplit("/", 1)[-1], files={"train": files[0], "validation": files[1]},
        default_experiment=f"hpml-{name}",
    )
