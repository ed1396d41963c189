"""Keep a training process from importing packages that transformers and peft load at import time for features
hpml never uses. On the H100 machines a start to the first step is 1.8-2.6 s shorter without them (11-13 s
instead of 14-15 s; issue 11's target is 15 s):

- scikit-learn (~1.8 s there): transformers' generation utilities import it for assisted decoding, and
  `import transformers.models.bert` reaches them through the auto classes. hpml does not generate text.
- bitsandbytes (~0.9 s): peft imports it (its 8-bit and 4-bit LoRA layers) and bitsandbytes registers its
  custom ops. Only variants with a 4-bit base or the 8-bit optimizer use it; for them it stays.

The means is Python's own: a `None` entry in `sys.modules` makes `importlib.util.find_spec` report the package
as absent, which is how transformers and peft decide whether to import it. It is done only at the start of a
training command, before transformers or peft is imported, and never in a process that already imported
them (an in-process caller such as the demo or the test suite keeps what it has). HPML_LEAN_IMPORTS=0 turns
it off.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from hpml.variants import Variant

ENV = "HPML_LEAN_IMPORTS"
UNUSED = ("sklearn",)
QUANTIZATION = ("bitsandbytes",)
_TOO_LATE = ("transformers", "peft")
_HIDDEN: list[str] = []  # what this process hid: the runs it starts carry it as a tag


def hidden() -> tuple[str, ...]:
    return tuple(_HIDDEN)


def hide_unused(variant: Optional[Variant] = None) -> tuple[str, ...]:
    """Hide what this process's training will not use; returns the packages hidden (none when it is off, too
    late, or they were imported already). `variant=None` (not known yet) keeps bitsandbytes."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no"):
        return ()
    if any(m in sys.modules for m in _TOO_LATE):
        return ()
    names = UNUSED + (QUANTIZATION if variant is not None and not variant.uses_bitsandbytes else ())
    now_hidden = tuple(n for n in names if n not in sys.modules)
    for n in now_hidden:
        sys.modules[n] = None  # type: ignore[assignment]  # find_spec -> None; `import n` -> ModuleNotFoundError
    _HIDDEN.extend(now_hidden)
    return now_hidden
