"""Input checks that run before any MLflow run exists: each bad value, file or path is one HpmlError line."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from hpml.errors import HpmlError, UsageError

# Tokens kept free for the question in every SQuAD window: BERT adds [CLS] q [SEP] c [SEP] (3 special
# tokens). SQuAD v2 questions are rarely longer than 40 word pieces; 64 leaves margin. A stride at or past
# the room left for the context makes the tokenizer fail mid-tokenization ("stride too big").
QUESTION_ROOM = 64
SPECIAL_TOKENS = 3
MIN_MAX_LENGTH = 8  # below this an SST-2 sentence keeps a word or two: surely a typo (2 for 256, 128 for 1024)
MAX_SEED = 2**32 - 1  # numpy's seed range, which transformers.set_seed feeds


# ---- numbers ---------------------------------------------------------------------------------------------
def _positive(name: str, value, fix: str = "") -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UsageError(f"{name} must be > 0, got {value!r}{fix}")


def _non_negative(name: str, value, meaning: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise UsageError(f"{name} must be >= 0 ({meaning}), got {value!r}")


def check_numbers(cfg) -> None:
    """Every numeric training option in range: the message names the option, the value and the valid range."""
    if cfg.max_steps < 0:
        raise UsageError(f"max_steps must be >= 0 (0 = train by epochs), got {cfg.max_steps}")
    if cfg.max_steps == 0:
        _positive("epochs", cfg.epochs, " (or set max_steps > 0 to train a fixed number of steps)")
    elif not math.isfinite(cfg.epochs):
        raise UsageError(f"epochs must be a finite number, got {cfg.epochs!r}")
    _positive("batch_size", cfg.batch_size)
    _positive("eval_batch_size", cfg.eval_batch_size)
    _non_negative("max_train_samples", cfg.max_train_samples, "0 = all")
    _non_negative("max_eval_samples", cfg.max_eval_samples, "0 = all")
    if cfg.lr is not None:
        _positive("lr", cfg.lr, " (or leave it empty for the variant's own)")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UsageError(f"seed must be in [0, {MAX_SEED}], got {cfg.seed}")
    if cfg.max_length < MIN_MAX_LENGTH:
        raise UsageError(f"max_length must be >= {MIN_MAX_LENGTH} tokens, got {cfg.max_length}")
    if getattr(cfg, "doc_stride", None) is not None:  # windowed tasks (SQuAD) only
        room = cfg.max_length - SPECIAL_TOKENS - QUESTION_ROOM
        if room <= 0:
            raise UsageError(f"max_length {cfg.max_length} leaves no room for the context after a question of "
                             f"up to {QUESTION_ROOM} tokens: use max_length >= {QUESTION_ROOM + SPECIAL_TOKENS + 32}")
        if not 0 <= cfg.doc_stride < room:
            raise UsageError(f"doc_stride must be in [0, {room}) for max_length {cfg.max_length} (max_length - "
                             f"{SPECIAL_TOKENS} special tokens - {QUESTION_ROOM} for the question), got "
                             f"{cfg.doc_stride}: lower doc_stride or raise max_length")
        _positive("n_best", cfg.n_best)
        _positive("max_answer_length", cfg.max_answer_length)
        if not math.isfinite(cfg.null_threshold):
            raise UsageError(f"null_threshold must be a finite number, got {cfg.null_threshold!r}")
    for name in ("save_steps", "save_total_limit"):
        value = getattr(cfg, name, 0)
        if value < 0:
            raise UsageError(f"{name} must be >= 0 (0 = {'save once per epoch' if name == 'save_steps' else 'keep all'})"
                             f", got {value}")


def model_max_positions(ref: str) -> Optional[int]:
    """The model's max_position_embeddings, read from its config without loading weights; None when the
    config is not on this machine (a hub ID: the loader reports that one itself)."""
    if ref.startswith("random:"):
        from transformers import BertConfig

        return BertConfig().max_position_embeddings
    path = os.path.join(ref, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("max_position_embeddings")
    except (OSError, ValueError) as exc:
        raise HpmlError(f"{path}: cannot read the model config ({exc}); pass a Hugging Face checkpoint folder") from None
    return int(value) if isinstance(value, int) else None


def check_model_length(cfg, resolved_ref: str) -> None:
    limit = model_max_positions(resolved_ref)
    if limit is not None and cfg.max_length > limit:
        raise UsageError(f"max_length {cfg.max_length} exceeds the {limit} positions of model {cfg.model!r}: "
                         f"use max_length <= {limit}")


# ---- files and folders -------------------------------------------------------------------------------------
def read_text(path: str, what: str, missing_hint: str) -> str:
    """A whole text file as UTF-8; a decoding error names the file and the byte offset of the first bad byte."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise HpmlError(f"{path}: no such file; {missing_hint}") from None
    except IsADirectoryError:
        raise HpmlError(f"{path} is a folder, expected {what}") from None
    except OSError as exc:
        raise HpmlError(f"cannot read {path} ({exc.strerror}): check the path and its permissions") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HpmlError(f"{path}: not UTF-8 at byte offset {exc.start} (byte 0x{raw[exc.start]:02x}): save "
                        f"{what} as UTF-8") from None


def check_data_dir(data_dir: str, files: list[str]) -> None:
    """data_dir exists, is a folder, and each named file in it can be read."""
    if not data_dir:
        return
    if not os.path.exists(data_dir):
        raise HpmlError(f"data_dir {data_dir!r} does not exist: pass a folder holding {' and '.join(files)}")
    if not os.path.isdir(data_dir):
        raise HpmlError(f"data_dir {data_dir!r} is a file, not a folder: pass the folder holding {' and '.join(files)}")
    for name in files:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path) and not os.access(path, os.R_OK):
            raise HpmlError(f"cannot read {path} (permission denied): make it readable (chmod +r)")


def check_writable_dir(path: str, what: str) -> None:
    """A folder that will be created or written: it must not be a file, and its nearest existing ancestor
    must be writable."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path} is a file, not a folder: pass a folder path")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{what} {path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HpmlError(f"{what} {path} is not writable ({probe}: permission denied): pass a folder you can write")


def check_writable_file(path: str, what: str) -> None:
    """A file that will be written: not a folder, its folder exists and is writable."""
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        raise UsageError(f"{what} {path} is a folder: pass a file path")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise HpmlError(f"{what} {path}: folder {parent} does not exist; create it first")
    if (os.path.exists(full) and not os.access(full, os.W_OK)) or not os.access(parent, os.W_OK | os.X_OK):
        raise HpmlError(f"{what} {path} is not writable (permission denied): pass a path you can write")


HUB = "https://huggingface.co"


def hub_reachable(timeout: float = 5.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(HUB, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_hub_model(ref: str) -> None:
    """A hub model ID: use the local cache when the hub is unreachable, else fail in one line within 5 s
    (the hub client otherwise retries for about 90 s and then blames a missing package)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json")
    if isinstance(cached, str):
        os.environ["HF_HUB_OFFLINE"] = "1"  # cached: load it from there without asking the hub
        return
    raise HpmlError(f"the Hugging Face hub ({HUB}) is unreachable and model {ref!r} is not in the local cache: "
                    "pass a local checkpoint folder, 'minilm' or random:<size>, or download it where there is network")


def check_train(cfg, variant) -> None:
    """Everything about a training run that can be checked without loading data or weights."""
    from hpml import modeling

    check_numbers(cfg)
    from hpml.tasks import get_task

    files = list(get_task(cfg.task).files.values())
    check_data_dir(cfg.data_dir, files)
    ref = modeling.resolve_model_ref(cfg.model)
    if not ref.startswith("random:") and not os.path.isdir(ref):
        check_hub_model(ref)
    check_model_length(cfg, ref)
    out = getattr(cfg, "output_dir", "")
    if out:
        check_writable_dir(out, "output_dir")
