"""MNLI-format sentence pairs: read GLUE MNLI TSV files (or the hub's GLUE mnli), validate, 3 labels."""
from __future__ import annotations

import os
from typing import Optional

from hpml.errors import HpmlError

LABELS = ("entailment", "neutral", "contradiction")  # label ids 0, 1, 2, as the hub's nyu-mll/glue mnli
COLUMNS = ("sentence1", "sentence2", "gold_label")  # GLUE's names; its files carry more columns, found by name
FILES = {"train": "train.tsv", "validation": "dev_matched.tsv"}
HUB_SPLITS = {"train": "train", "validation": "validation_matched"}


def read_tsv(path: str) -> dict[str, list]:
    """Parse a GLUE MNLI TSV: a header naming sentence1, sentence2 and gold_label (other columns ignored)."""
    if not os.path.isfile(path):
        raise HpmlError(f"MNLI file {path} not found: data_dir must hold GLUE-format train.tsv and "
                        "dev_matched.tsv (hpml make-data mnli --out DIR writes a generated pair)")
    premises, hypotheses, labels = [], [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise HpmlError(f"{path}: header lacks {', '.join(missing)}; expected GLUE MNLI columns "
                            "sentence1<TAB>sentence2<TAB>gold_label")
        at = [header.index(c) for c in COLUMNS]
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) < len(header) or parts[at[2]].strip() not in LABELS:
                raise HpmlError(f"{path}:{lineno}: expected {len(header)} tab-separated fields with gold_label "
                                f"one of {', '.join(LABELS)}, got {line[:60]!r}")
            premises.append(parts[at[0]].strip())
            hypotheses.append(parts[at[1]].strip())
            labels.append(LABELS.index(parts[at[2]].strip()))
    if not premises:
        raise HpmlError(f"{path}: no rows after the header")
    return {"premise": premises, "hypothesis": hypotheses, "label": labels}


def load_mnli(data_dir: Optional[str], split: str, max_samples: int = 0, revision: Optional[str] = None):
    """First `max_samples` rows (0 = all) of a split, from data_dir or the hub's nyu-mll/glue mnli."""
    from hpml.data.glue import load_split

    return load_split("mnli", read_tsv, data_dir, FILES[split], HUB_SPLITS[split], ("premise", "hypothesis", "label"),
                      "train.tsv/dev_matched.tsv", max_samples, revision)
