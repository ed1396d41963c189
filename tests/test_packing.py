"""Packed batches compute what padded batches compute: per-feature logits, loss, predictions, labels."""
import collections

import numpy as np
import pytest
import torch

from hpml import modeling, packing
from hpml.data import squad
from hpml.data.batching import Collator
from hpml.variants import get_variant


@pytest.fixture(scope="module")
def tiny_qa(squad_dir, tmp_path_factory):
    """A random tiny BERT (dropout off, fp32) and real hpml SQuAD features of the generated data."""
    tok = modeling.load_tokenizer("random:tiny")
    examples = squad.load_squad(str(squad_dir), "validation").select(range(12))
    train = squad.load_squad(str(squad_dir), "train").select(range(24))
    feats = examples.map(lambda b: squad.prepare_eval_features(b, tok, 128, 32), batched=True,
                         remove_columns=examples.column_names)
    train_feats = train.map(lambda b: squad.prepare_train_features(b, tok, 128, 32), batched=True,
                            remove_columns=train.column_names)
    packing.register_attention()
    torch.manual_seed(0)
    config = modeling.random_config("tiny", "squad")
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config._attn_implementation = packing.VARLEN
    model = modeling.model_class("squad").from_config(config).eval()
    return tok, examples, feats, train_feats, model


def padded_logits(model, tok, rows):
    rows = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
    batch = Collator(tok.pad_token_id, 128, get_variant("a2").batching)(rows)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"])
    return out.start_logits, out.end_logits, batch["attention_mask"].bool()


def own_token_ce(logits, mask, target):
    """Cross-entropy over each feature's own tokens (pad positions excluded) from padded logits."""
    logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return -logp[torch.arange(len(target)), target]


def test_packed_forward_matches_padded_logits_loss_and_predictions(tiny_qa):
    tok, examples, feats, train_feats, model = tiny_qa
    rows = [{k: f[k] for k in ("input_ids", "token_type_ids")} for f in feats]
    lengths = [len(r["input_ids"]) for r in rows]
    col = packing.PackedCollator(tok.pad_token_id, max_tokens=512, max_length=128,
                                 max_segments=packing.max_segments(lengths, 512, 128))
    start, end, _ = packing.predict_qa(model, rows, col, "cpu")
    ps, pe, mask = padded_logits(model, tok, rows)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(start[i, :n], ps[i, :n].numpy(), rtol=0, atol=2e-5)
        np.testing.assert_allclose(end[i, :n], pe[i, :n].numpy(), rtol=0, atol=2e-5)
    assert len({len(p) for p in packing.pack_indices(lengths, 512)}) >= 1 and len(start) == len(rows)
    kw = dict(n_best=20, max_answer_length=30)
    packed = squad.postprocess_predictions(examples, feats, start, end, **kw)
    padded = squad.postprocess_predictions(examples, feats, ps.numpy(), pe.numpy(), **kw)
    assert packed.predictions == padded.predictions
    assert np.allclose(list(packed.null_odds.values()), list(padded.null_odds.values()), atol=1e-4)

    # loss: a pack of labelled training features vs the padded logits' per-feature cross-entropy
    trows = [{k: f[k] for k in ("input_ids", "token_type_ids", "start_positions", "end_positions")}
             for f in train_feats.select(range(6))]
    tl = [len(r["input_ids"]) for r in trows]
    tcol = packing.PackedCollator(tok.pad_token_id, sum(tl) + 40, 128, packing.max_segments(tl, sum(tl) + 40, 128))
    batch = tcol(trows)
    with torch.no_grad():
        out = model(**packing.model_inputs(batch))
    loss = packing.packed_qa_loss(out.start_logits, out.end_logits, batch)
    ps, pe, mask = padded_logits(model, tok, trows)
    s = torch.tensor([r["start_positions"] for r in trows])
    e = torch.tensor([r["end_positions"] for r in trows])
    ref = ((own_token_ce(ps, mask, s) + own_token_ce(pe, mask, e)) / 2).mean()
    assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
    assert any(r["start_positions"] > 0 for r in trows), "the check needs answerable features too"


def test_packed_loss_gradients_are_finite_with_empty_segment_slots(tiny_qa):
    tok, _, _, train_feats, model = tiny_qa
    rows = [dict(train_feats[i]) for i in range(3)]
    col = packing.PackedCollator(tok.pad_token_id, 512, 128, 40)  # 36 zero-length slots after the dummy
    batch = col(rows)
    model.zero_grad()
    out = model(**packing.model_inputs(batch))
    packing.packed_qa_loss(out.start_logits, out.end_logits, batch).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_token_budget_batches_hold_every_feature_once_per_epoch_with_its_own_labels(tiny_qa):
    tok, _, _, train_feats, _ = tiny_qa
    rows = [dict(f) for f in train_feats]
    lengths = [len(r["input_ids"]) for r in rows]
    budget = 700  # leaves pad tails longer than max_length: they must be split
    sampler = packing.TokenBudgetBatchSampler(lengths, budget, seed=3)
    col = packing.PackedCollator(tok.pad_token_id, budget, 128, packing.max_segments(lengths, budget, 128))
    expected = collections.Counter((tuple(r["input_ids"]), r["start_positions"], r["end_positions"]) for r in rows)
    orders = []
    for _ in range(2):  # two epochs: each complete, each its own shuffle
        assert len(sampler) > 1
        seen, order = collections.Counter(), []
        packs = list(iter(sampler))
        for idx in packs:
            b = col([rows[i] for i in idx])
            assert b["input_ids"].shape == (1, budget) and b["cu_seq_lens_q"].shape == (col.max_segments + 1,)
            cu = b["cu_seq_lens_q"].tolist()
            assert max(np.diff(cu)) <= 128 and int(b["position_ids"].max()) < 128  # pad tail cut too
            for j in range(int(b["n_features"])):
                ids = tuple(b["input_ids"][0, cu[j]:cu[j + 1]].tolist())
                assert b["position_ids"][0, cu[j]:cu[j + 1]].tolist() == list(range(len(ids)))
                seen[(ids, int(b["start_positions"][j]) - cu[j], int(b["end_positions"][j]) - cu[j])] += 1
            order += idx
        assert seen == expected
        orders.append(order)
    assert orders[0] != orders[1]
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack_indices([10, budget + 1], budget)


def test_compiled_packed_loss_is_one_graph_with_the_eager_loss_and_gradients(tiny_qa):
    # compiled variants run the loss compiled (fullgraph: a graph break would raise); aot_eager traces it the
    # way inductor does, without a C++ toolchain
    tok, _, _, train_feats, model = tiny_qa
    rows = [dict(train_feats[i]) for i in range(5)]
    lengths = [len(r["input_ids"]) for r in rows]
    batch = packing.PackedCollator(tok.pad_token_id, 600, 128, packing.max_segments(lengths, 600, 128))(rows)
    with torch.no_grad():
        out = model(**packing.model_inputs(batch))
    grads, losses = [], []
    for fn in (None, packing.qa_loss_function("aot_eager")):
        s = out.start_logits.detach().clone().requires_grad_()
        e = out.end_logits.detach().clone().requires_grad_()
        loss = packing.packed_qa_loss(s, e, batch, fn)
        loss.backward()
        losses.append(loss.item())
        grads.append((s.grad, e.grad))
    assert losses[0] > 0 and abs(losses[0] - losses[1]) < 1e-6, losses
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-7) and torch.allclose(grads[0][1], grads[1][1], atol=1e-7)
    assert packing.qa_loss_function(None) is packing._qa_loss  # uncompiled variants keep the eager loss
