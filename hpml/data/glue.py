"""Loading one split of a GLUE task: from a folder of GLUE-format TSV files, or from the hub's nyu-mll/glue."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from hpml.errors import HpmlError


def load_split(config: str, read_tsv: Callable[[str], dict], data_dir: Optional[str], file: str, hub_split: str,
               columns: Sequence[str], files_hint: str, max_samples: int = 0, revision: Optional[str] = None):
    """First `max_samples` rows (0 = all): `read_tsv(data_dir/file)` when data_dir is given, else the hub's
    nyu-mll/glue `config` at `hub_split` (at `revision`, a commit, when given), reduced to `columns`."""
    import datasets

    if data_dir:
        ds = datasets.Dataset.from_dict(read_tsv(os.path.join(data_dir, file)))
    else:
        try:
            ds = datasets.load_dataset("nyu-mll/glue", config, split=hub_split, revision=revision)
            ds = ds.select_columns(list(columns))
        except Exception as exc:
            raise HpmlError(f"cannot load GLUE {config} from the hub ({type(exc).__name__}): pass data_dir with "
                            f"GLUE-format {files_hint}") from None
    if max_samples and max_samples < len(ds):
        ds = ds.select(range(max_samples))
    return ds
