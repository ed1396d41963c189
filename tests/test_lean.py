"""A training command keeps scikit-learn (and bitsandbytes, unless its variant quantizes) out of its process,
and transformers, peft and a LoRA training step still work without them."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SCRIPT = r"""
import json, os, sys
from hpml import lean
from hpml.variants import get_variant

out = {}
os.environ["HPML_LEAN_IMPORTS"] = "0"
out["off"] = lean.hide_unused(get_variant("a2", "squad"))
del os.environ["HPML_LEAN_IMPORTS"]
out["quantized"] = lean.hide_unused(get_variant("c1", "squad"))  # 8-bit AdamW: bitsandbytes stays
out["full"] = lean.hide_unused(get_variant("a2", "squad"))      # what is left to hide
out["unknown"] = lean.hide_unused(None)

import torch, peft, transformers
from transformers import BertConfig, BertForQuestionAnswering, Trainer, TrainingArguments  # noqa: F401

model = BertForQuestionAnswering(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32))
model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value"]))
ids = torch.randint(0, 50, (2, 8))
loss = model(input_ids=ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])).loss
loss.backward()
out["loss_finite"] = bool(torch.isfinite(loss))
out["absent"] = [m for m in ("sklearn", "bitsandbytes") if sys.modules.get(m, "x") is None]
out["too_late"] = lean.hide_unused(get_variant("a2", "squad"))
print(json.dumps(out))
"""


def test_training_process_leaves_unused_packages_out_and_still_trains():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["off"] == []  # HPML_LEAN_IMPORTS=0
    assert out["quantized"] == ["sklearn"]  # a bitsandbytes variant keeps it
    assert out["full"] == ["bitsandbytes"]  # sklearn was hidden already
    assert out["unknown"] == []
    assert out["loss_finite"] is True  # transformers, peft and a LoRA step work without them
    assert out["absent"] == ["sklearn", "bitsandbytes"]
    assert out["too_late"] == []  # transformers is loaded: nothing changes any more


def test_an_in_process_caller_keeps_what_it_has():
    import transformers  # noqa: F401  # the suite's own process, like the demo's

    from hpml import lean
    from hpml.variants import get_variant

    before = {m: sys.modules.get(m) for m in ("sklearn", "bitsandbytes")}
    assert lean.hide_unused(get_variant("a2", "squad")) == ()
    assert {m: sys.modules.get(m) for m in ("sklearn", "bitsandbytes")} == before
