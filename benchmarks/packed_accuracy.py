"""Does packing change what the model learns? a2 (padded batches) vs packed, same model, lr, epochs, seeds.

Both arms train the same pretrained checkpoint on the same generated SQuAD v2 features with AdamW (fused on
CUDA), linear decay, clipping at 1.0 and bf16 autocast on CUDA; a2 pads every batch of `batch_size` features
to max_length and uses the model's own loss over SDPA; packed lays features end to end to a token budget of
batch_size x the mean feature length (the same features per step on average), with hpml's varlen attention
(no attention-probability dropout) and per-feature loss. Both are scored with hpml's postprocessing and
SQuAD v2 metric (packed evaluation for the packed arm). Needs only torch and transformers (and tokenizers
>= 0.23.3); on the GPU machine:

    python3 benchmarks/packed_accuracy.py --model .gpu-minilm --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpml import bench, modeling, packing  # noqa: E402
from hpml.data import squad, synthetic  # noqa: E402
from hpml.metrics import squad_v2  # noqa: E402


def columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def rows_of(enc, keys) -> list[dict]:
    return [{k: (np.asarray(enc[k][i]) if isinstance(enc[k][i], list) else enc[k][i]) for k in keys}
            for i in range(len(enc["input_ids"]))]


def run(arm: str, args, train, dev, dev_feats, dev_rows, seed: int, device: str) -> dict:
    from transformers import BertForQuestionAnswering

    attn = packing.register_attention() if arm == "packed" else "sdpa"
    torch.manual_seed(seed)
    model = BertForQuestionAnswering.from_pretrained(args.model, dtype=torch.float32,
                                                     attn_implementation=attn).to(device)
    lengths = np.array([len(r["input_ids"]) for r in train])
    budget = int(round(args.batch_size * lengths.mean()))
    if arm == "packed":
        sampler = packing.TokenBudgetBatchSampler(lengths, budget, seed=seed)
        col = packing.PackedCollator(0, budget, args.max_length, packing.max_segments(lengths, budget, args.max_length))
        epochs = [list(iter(sampler)) for _ in range(args.epochs)]
    else:
        rng = np.random.default_rng(seed)
        epochs = []
        for _ in range(args.epochs):
            order = rng.permutation(len(train)).tolist()
            epochs.append([order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)])
    total = sum(len(e) for e in epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else torch.enable_grad
    model.train()
    t0 = time.perf_counter()
    for batches in epochs:
        for idx in batches:
            rows = [train[i] for i in idx]
            if arm == "packed":
                b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in col(rows).items()}
                with ctx():
                    out = model(**packing.model_inputs(b))
                    loss = packing.packed_qa_loss(out.start_logits, out.end_logits, b)
            else:
                b = {k: v.to(device) for k, v in bench.padded(rows, args.max_length).items()}
                with ctx():
                    loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    dtype = torch.bfloat16 if device == "cuda" else None
    if arm == "packed":
        dl = [len(r["input_ids"]) for r in dev]
        ecol = packing.PackedCollator(0, 16384, args.max_length, packing.max_segments(dl, 16384, args.max_length))
        start, end, _ = packing.predict_qa(model, dev, ecol, device, dtype)
    else:
        model.eval()
        starts, ends = [], []
        with torch.inference_mode(), ctx():
            for i in range(0, len(dev), 128):
                b = {k: v.to(device) for k, v in bench.padded(dev[i:i + 128], args.max_length, labels=False).items()}
                out = model(**b)
                starts.append(out.start_logits.float().cpu())
                ends.append(out.end_logits.float().cpu())
        start, end = torch.cat(starts).numpy(), torch.cat(ends).numpy()
    result = squad.postprocess_predictions(dev_rows, dev_feats, start, end)
    scores = squad_v2.evaluate(dev_rows, result.predictions, na_probs=result.null_odds)
    return {"arm": arm, "seed": seed, "em": round(scores["exact"], 2), "f1": round(scores["f1"], 2),
            "HasAns_f1": round(scores["HasAns_f1"], 2), "NoAns_exact": round(scores["NoAns_exact"], 2),
            "steps": total, "tokens_per_packed_step": budget if arm == "packed" else None,
            "final_loss": round(loss.item(), 3), "train_s": round(train_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".gpu-minilm", help="checkpoint folder (all layers are used)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--train", type=int, default=4000, help="generated training questions")
    ap.add_argument("--dev", type=int, default=600)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--doc-stride", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/hpml-packed-accuracy")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = modeling.load_tokenizer(args.model)
    paths = synthetic.write_squad(args.workdir, args.train, args.dev, seed=7)
    train_rows, dev_rows = (squad.load_squad_json(p) for p in paths)
    tr = squad.prepare_train_features(columns(train_rows), tokenizer, args.max_length, args.doc_stride)
    ev = squad.prepare_eval_features(columns(dev_rows), tokenizer, args.max_length, args.doc_stride)
    train = rows_of(tr, ("input_ids", "token_type_ids", "start_positions", "end_positions"))
    dev = rows_of(ev, ("input_ids", "token_type_ids"))
    dev_feats = [{"example_id": a, "offset_mapping": b} for a, b in zip(ev["example_id"], ev["offset_mapping"])]
    for seed in args.seeds:
        for arm in ("a2", "packed"):
            print(json.dumps({"model": args.model, "lr": args.lr, "epochs": args.epochs, "features": len(train),
                              **run(arm, args, train, dev, dev_feats, dev_rows, seed, device)}), flush=True)


if __name__ == "__main__":
    main()
