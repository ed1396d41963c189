"""Batch collation: pad to max_length (one shape) or to the batch's longest row rounded up (few shapes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpml.variants import Batching

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "labels", "start_positions", "end_positions")


@dataclass
class Collator:
    """Pads model inputs only; bookkeeping columns (length, example_id, offsets) never reach the model."""

    pad_token_id: int
    max_length: int
    batching: Batching

    def target_length(self, longest: int) -> int:
        if self.batching.padding == "max_length":
            return self.max_length
        m = self.batching.pad_to_multiple_of
        # Rounding up bounds the distinct shapes a compiled model sees to max_length / m.
        return min(self.max_length, -(-longest // m) * m) if m else longest

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = self.target_length(max(len(r["input_ids"]) for r in rows))
        out: dict[str, torch.Tensor] = {}
        for key in MODEL_INPUTS:
            if key not in rows[0]:
                continue
            if key in ("input_ids", "token_type_ids", "attention_mask"):
                fill = self.pad_token_id if key == "input_ids" else 0
                out[key] = torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows])
            else:
                out[key] = torch.tensor([r[key] for r in rows])
        return out
