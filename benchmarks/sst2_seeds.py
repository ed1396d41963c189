"""How much does the real-data SST-2 check move with the seed and the recipe? (docs/benchmarks.md)

The setup of tests/test_training_sst2.py's real-data test (MiniLM, the first 4,000 rows of GLUE SST-2 train,
1 epoch, the whole dev set), trained as hpml's fp32 variant trains it: the Trainer with AdamW, a linear
schedule, per-batch padding, the head initialised under the run's seed. Only torch and transformers are
needed, so it runs on the device image as is:

    python3 benchmarks/sst2_seeds.py --model .gpu-minilm --data .gpu-data/sst2 --seeds 42 1 2 3 4 \\
        --recipe 1e-4,16,0,0 --recipe 2e-4,32,0.1,0

A recipe is lr,batch_size,warmup_ratio,weight_decay. Prints one JSON line per run, then mean and min per recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpml.data import sst2  # noqa: E402


def features(tokenizer, path: str, n: int = 0) -> list[dict]:
    table = sst2.read_tsv(path)
    sentences, labels = table["sentence"][:n or None], table["label"][:n or None]
    enc = tokenizer(sentences, truncation=True, max_length=128)
    return [{"input_ids": i, "attention_mask": a, "token_type_ids": t, "labels": y}
            for i, a, t, y in zip(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], labels)]


def one_run(model_dir: str, tokenizer, train, dev, lr: float, bs: int, warm: float, wd: float, seed: int) -> float:
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    torch.manual_seed(seed)  # the new classifier head, as hpml initialises it
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    args = TrainingArguments("/tmp/hpml-sst2-seeds", num_train_epochs=1, per_device_train_batch_size=bs,
                             per_device_eval_batch_size=64, learning_rate=lr, warmup_steps=warm, weight_decay=wd,
                             lr_scheduler_type="linear", seed=seed, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
                      compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    trainer.train()
    return trainer.evaluate(dev)["eval_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="MiniLM checkpoint folder")
    ap.add_argument("--data", required=True, help="folder with GLUE-format train.tsv and dev.tsv")
    ap.add_argument("--train-rows", type=int, default=4000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    ap.add_argument("--recipe", action="append", default=[], help="lr,batch_size,warmup_ratio,weight_decay")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = features(tokenizer, os.path.join(args.data, "train.tsv"), args.train_rows)
    dev = features(tokenizer, os.path.join(args.data, "dev.tsv"))
    summary = {}
    for recipe in args.recipe or ["1e-4,16,0,0"]:
        lr, bs, warm, wd = (float(x) for x in recipe.split(","))
        for seed in args.seeds:
            t0 = time.perf_counter()
            acc = one_run(args.model, tokenizer, train, dev, lr, int(bs), warm, wd, seed)
            summary.setdefault(recipe, []).append(acc)
            print(json.dumps({"recipe": recipe, "seed": seed, "accuracy": round(acc, 4),
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    for recipe, accs in summary.items():
        print(json.dumps({"recipe": recipe, "runs": len(accs), "mean": round(statistics.mean(accs), 4),
                          "min": round(min(accs), 4), "max": round(max(accs), 4)}))


if __name__ == "__main__":
    main()
