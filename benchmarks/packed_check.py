"""GPU check of the packed path: varlen-kernel logits vs padded SDPA logits of the same features and weights.

Prints the relative error of start/end logits (bf16 autocast on both sides) and that a packed backward runs.
Usage (on the GPU machine): python3 benchmarks/packed_check.py [random:bert-base]
"""
import sys

import torch

from hpml import bench, modeling, packing


def main(model_ref: str = "random:bert-base") -> None:
    config, _ = bench.base_config(model_ref)
    config.hidden_dropout_prob = 0.0
    feats = bench.squad_shaped_features(96, 384, seed=3)
    torch.manual_seed(0)
    init = modeling.model_class("squad").from_config(config).state_dict()
    packed_model = bench.build(None, config, init, "cuda", packing.register_attention()).eval()
    padded_model = bench.build(None, config, init, "cuda", "sdpa").eval()
    lengths = [len(f["input_ids"]) for f in feats]
    col = packing.PackedCollator(0, 40000, 384, packing.max_segments(lengths, 40000, 384))
    rows = [{k: f[k] for k in ("input_ids", "token_type_ids")} for f in feats]
    start, end, _ = packing.predict_qa(packed_model, rows, col, "cuda", torch.bfloat16)
    pb = {k: v.cuda() for k, v in bench.padded(feats, 384, labels=False).items()}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = padded_model(**pb)
    for name, got, want in (("start", start, ref.start_logits), ("end", end, ref.end_logits)):
        num = den = 0.0
        for i, n in enumerate(lengths):
            w = want[i, :n].float().cpu()
            num += float(((torch.from_numpy(got[i, :n]) - w) ** 2).sum())
            den += float((w ** 2).sum())
        print(f"packed vs padded {name} logits: relative error {(num / den) ** 0.5:.2e} (bf16)")
    packed_model.train()
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in
             packing.PackedCollator(0, 16384, 384, packing.max_segments(lengths, 16384, 384))(feats[:40]).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = packed_model(**packing.model_inputs(batch))
        loss = packing.packed_qa_loss(out.start_logits, out.end_logits, batch)
    loss.backward()
    ok = all(torch.isfinite(p.grad).all() for p in packed_model.parameters() if p.grad is not None)
    print(f"packed backward: loss {loss.item():.4f}, finite gradients: {ok}")


if __name__ == "__main__":
    main(*sys.argv[1:])
