"""Large prediction requests: sentences are batched by length and the answers come back in request order."""
from types import SimpleNamespace

import torch

from hpml import modeling, serving


class CountTokens(torch.nn.Module):
    """A stand-in classifier whose logits are the row's real token count: each answer names its input."""

    def forward(self, input_ids, attention_mask, **_):
        n = attention_mask.sum(dim=1).float()
        return SimpleNamespace(logits=torch.stack([n, torch.zeros_like(n)], dim=1))


def test_batches_by_length_and_answers_in_request_order():
    tok = modeling.load_tokenizer(modeling.resolve_model_ref("random:tiny"))
    loaded = serving.Loaded(model=CountTokens(), tokenizer=tok, meta={"max_length": 64}, device="cpu")
    texts = [" ".join(["word"] * n) for n in (9, 1, 30, 4, 17, 2, 9, 25)]
    out = serving.predict_sst2(loaded, texts, batch_size=3)
    want = [torch.softmax(torch.tensor([n + 2.0, 0.0]), 0).max().item() for n in (9, 1, 30, 4, 17, 2, 9, 25)]
    assert [round(o["probability"], 6) for o in out] == [round(w, 6) for w in want]  # [CLS] + n + [SEP]
    assert all(o["label"] == 0 for o in out)
