"""Which small model learns hpml's generated SQuAD v2 in a few hundred steps? (docs/benchmarks.md)

A bare training loop with the Trainer's defaults as hpml's `a2` uses them (AdamW, no weight decay, linear
decay, gradient clipping at 1.0, shuffled epochs) on `hpml make-data squad`-style data, scored with hpml's own
postprocessing and SQuAD v2 metric. It needs only torch and transformers, so it runs on the device image
without the wheels:

    HPML_TOKENIZER=.gpu-tok python3 benchmarks/squad_learnability.py --model random:tiny --lr 1e-3 \\
        --steps 300 600 1200 --train 10000
    python3 benchmarks/squad_learnability.py --model .gpu-minilm --layers 2 --lr 5e-4 \\
        --seeds 1 2 3 4

Prints one JSON line per (steps, seed): EM, the all-no-answer baseline (NoAns share), gain, HasAns/NoAns EM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpml import modeling  # noqa: E402
from hpml.data import squad, synthetic  # noqa: E402
from hpml.metrics import squad_v2  # noqa: E402


def columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def padded(rows: list[list[int]], device: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)


def make_data(tokenizer, n_train: int, n_dev: int, max_length: int, stride: int, device: str, workdir: str):
    paths = synthetic.write_squad(workdir, n_train, n_dev, seed=7)
    train_rows, dev_rows = (squad.load_squad_json(p) for p in paths)
    tr = squad.prepare_train_features(columns(train_rows), tokenizer, max_length, stride)
    ev = squad.prepare_eval_features(columns(dev_rows), tokenizer, max_length, stride)
    keys = ("input_ids", "token_type_ids", "attention_mask")
    train = {k: padded(tr[k], device) for k in keys}
    train.update({k: torch.tensor(tr[k], device=device) for k in ("start_positions", "end_positions")})
    dev = {k: padded(ev[k], device) for k in keys}
    features = [{"example_id": a, "offset_mapping": b} for a, b in zip(ev["example_id"], ev["offset_mapping"])]
    return train, dev, features, dev_rows


def build(model_ref: str, layers: int, seed: int, device: str):
    from transformers import BertForQuestionAnswering

    torch.manual_seed(seed)
    if model_ref.startswith("random:"):
        model = BertForQuestionAnswering(modeling.random_config(model_ref.split(":", 1)[1], "squad"))
    else:
        extra = {"num_hidden_layers": layers} if layers else {}
        model = BertForQuestionAnswering.from_pretrained(model_ref, dtype=torch.float32, **extra)
    return model.to(device)


def train_and_score(data, args, steps: int, seed: int, device: str) -> dict:
    train, dev, features, dev_rows = data
    model = build(args.model, args.layers, seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    n = len(train["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    model.train()
    for _ in range(steps):
        if pos + args.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + args.batch_size].to(device)
        pos += args.batch_size
        loss = model(**{k: v[idx] for k, v in train.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for i in range(0, len(dev["input_ids"]), 256):
            out = model(**{k: v[i:i + 256] for k, v in dev.items()})
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
    result = squad.postprocess_predictions(dev_rows, features, torch.cat(starts).numpy(), torch.cat(ends).numpy())
    scores = squad_v2.evaluate(dev_rows, result.predictions, na_probs=result.null_odds)
    baseline = 100.0 * scores["NoAns_total"] / scores["total"]
    return {"em": round(scores["exact"], 1), "no_answer_baseline": round(baseline, 1),
            "gain": round(scores["exact"] - baseline, 1), "HasAns_exact": round(scores["HasAns_exact"], 1),
            "NoAns_exact": round(scores["NoAns_exact"], 1), "final_train_loss": round(loss.item(), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:tiny", help="random:<size> or a checkpoint folder")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N layers of a checkpoint (0 = all)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="+", default=[300])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--train", type=int, default=1500, help="generated training questions")
    ap.add_argument("--dev", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--doc-stride", type=int, default=48)
    ap.add_argument("--workdir", default="/tmp/hpml-learnability")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = modeling.load_tokenizer(args.model)  # random:<size>: HPML_TOKENIZER or MiniLM's vocabulary
    data = make_data(tokenizer, args.train, args.dev, args.max_length, args.doc_stride, device, args.workdir)
    for steps in args.steps:
        for seed in args.seeds:
            t0 = time.perf_counter()
            row = train_and_score(data, args, steps, seed, device)
            print(json.dumps({"model": args.model, "layers": args.layers, "lr": args.lr, "batch_size": args.batch_size,
                              "train_questions": args.train, "steps": steps, "seed": seed, **row,
                              "seconds": round(time.perf_counter() - t0, 1), "device": device}), flush=True)


if __name__ == "__main__":
    main()
