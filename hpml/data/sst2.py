"""SST-2: read GLUE-format TSV files (or the hub's GLUE sst2) and validate them (tasks/classification.py tokenizes)."""
from __future__ import annotations

import os
from typing import Optional

from hpml.errors import HpmlError

HEADER = ["sentence", "label"]
FILES = {"train": "train.tsv", "validation": "dev.tsv"}


def read_tsv(path: str) -> dict[str, list]:
    """Parse a GLUE SST-2 TSV: header `sentence<TAB>label`, labels 0/1. Quotes are literal text (no CSV quoting)."""
    if not os.path.isfile(path):
        raise HpmlError(f"SST-2 file {path} not found: data_dir must hold GLUE-format train.tsv and dev.tsv "
                        "(hpml make-data sst2 --out DIR writes a generated pair)")
    from hpml.validate import read_text

    sentences, labels = [], []
    lines = read_text(path, "the GLUE SST-2 TSV file", "hpml make-data sst2 --out DIR writes one").split("\n")
    header = lines[0].rstrip("\r").split("\t")
    if header != HEADER:
        raise HpmlError(f"{path}: header is {header!r}, expected 'sentence<TAB>label' (GLUE SST-2 format)")
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
            raise HpmlError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
        sentences.append(parts[0].strip())
        labels.append(int(parts[1]))
    if not sentences:
        raise HpmlError(f"{path}: no rows after the header")
    return {"sentence": sentences, "label": labels}


def load_sst2(data_dir: Optional[str], split: str, max_samples: int = 0, revision: Optional[str] = None):
    """First `max_samples` rows (0 = all) of a split, from data_dir or the hub's nyu-mll/glue sst2 (at
    `revision`, a commit, when given)."""
    from hpml.data.glue import load_split

    return load_split("sst2", read_tsv, data_dir, FILES[split], split, HEADER, "train.tsv/dev.tsv", max_samples,
                      revision)
