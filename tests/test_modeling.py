"""The technique pipeline: precision picked by real hardware support, generic layer freezing, and each
technique present in the built model / Trainer arguments."""
import os

import pytest
import torch

from hpml import modeling
from hpml.errors import UsageError
from hpml.tasks import get_task
from hpml.variants import get_variant


@pytest.mark.parametrize("capability,expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_picks_bf16_only_where_it_is_native(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # a T4 (7.5) answers yes here because it emulates bf16: the choice must not follow this
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert modeling.resolve_precision(get_variant("a2"), "cuda") == expected


def test_precision_tags_say_what_runs():
    assert modeling.resolve_precision(get_variant("a2"), "cpu") == "fp32"
    assert modeling.resolve_precision(get_variant("bf16"), "cpu") == "bf16"
    # QLoRA: 4-bit layers computing in fp16; the Trainer adds no autocast on top
    assert modeling.resolve_precision(get_variant("qlora"), "cuda") == "nf4-fp16"
    args = modeling.trainer_arguments(get_variant("qlora"), "nf4-fp16")
    assert not args["fp16"] and not args["bf16"]


def test_compile_mode_reaches_the_trainer():
    import transformers

    # p2's CUDA graphs are torch.compile mode reduce-overhead: the Trainer compiles in that mode
    p2 = modeling.trainer_arguments(get_variant("p2", "squad"), "bf16", "cuda")
    assert (p2["torch_compile"], p2["torch_compile_mode"], p2["optim"]) == (True, "reduce-overhead", "adamw_torch_fused")
    assert modeling.trainer_arguments(get_variant("p1", "squad"), "bf16", "cuda")["torch_compile_mode"] is None
    assert transformers.TrainingArguments("/tmp/x", **p2, use_cpu=True).torch_compile_mode == "reduce-overhead"


def tiny_encoder(kind: str):
    import transformers

    common = dict(vocab_size=100, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
    if kind == "bert":
        return transformers.BertForQuestionAnswering(transformers.BertConfig(num_hidden_layers=4, **common))
    if kind == "roberta":
        return transformers.RobertaForQuestionAnswering(transformers.RobertaConfig(num_hidden_layers=4, **common))
    return transformers.DistilBertForQuestionAnswering(transformers.DistilBertConfig(
        vocab_size=100, dim=32, n_heads=2, hidden_dim=64, n_layers=4, max_position_embeddings=64))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_freeze_lower_finds_the_encoder_layers_of_any_encoder(kind):
    model = modeling.apply_freeze_lower(tiny_encoder(kind), 0.5, "b3")
    embeddings, layers = modeling.encoder_parts(model)
    assert not any(p.requires_grad for p in embeddings.parameters())
    assert [all(not p.requires_grad for p in layer.parameters()) for layer in layers] == [True, True, False, False]
    assert all(p.requires_grad for p in model.qa_outputs.parameters())


def test_freeze_lower_refuses_a_model_without_an_encoder_layer_list():
    import transformers

    gpt2 = transformers.GPT2ForQuestionAnswering(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UsageError, match="variant b3 freezes lower encoder layers, but GPT2ForQuestionAnswering"):
        modeling.apply_freeze_lower(gpt2, 0.5, "b3")


@pytest.mark.parametrize("variant_id", ["a1", "a3", "b2", "b3", "c2", "d1", "a4-b"])
def test_the_pipeline_applies_each_technique(variant_id, tmp_path):
    variant = get_variant(variant_id)
    built = modeling.apply_techniques(variant, get_task("squad"), "random:tiny", str(tmp_path), 0, "cpu")
    assert built.model.config._attn_implementation == variant.attention.impl
    args = built.arguments
    assert args["torch_compile"] == variant.compile.enabled
    assert args["torch_compile_backend"] == (variant.compile.backend if variant.compile.enabled else None)
    assert args.get("gradient_checkpointing", False) == variant.memory.gradient_checkpointing
    assert args["train_sampling_strategy"] == ("group_by_length" if variant.batching.group_by_length else "random")
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    if variant_id == "b2":
        assert trainable and all(n.endswith(".bias") or n.startswith("qa_outputs.") for n in trainable)
    if variant_id == "b3":
        assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in trainable)
        assert any(n.startswith("bert.encoder.layer.1.") for n in trainable)


def test_a_random_base_is_built_once_per_seed_and_copied_from_the_cache(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForQuestionAnswering

    monkeypatch.setenv("HPML_CACHE_DIR", str(tmp_path / "cache"))
    first = modeling.materialize_random("random:tiny", "squad", str(tmp_path / "a"), seed=3)
    built = []
    real = AutoModelForQuestionAnswering.from_config
    monkeypatch.setattr(AutoModelForQuestionAnswering, "from_config", lambda *a, **k: built.append(1) or real(*a, **k))
    again = modeling.materialize_random("random:tiny", "squad", str(tmp_path / "b"), seed=3)
    assert built == []  # the second run copied the cached weights
    w1, w2 = (load_file(f"{d}/model.safetensors") for d in (first, again))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert sorted(os.listdir(first)) == sorted(os.listdir(again))  # the tokenizer is saved beside them too
    other = modeling.materialize_random("random:tiny", "squad", str(tmp_path / "c"), seed=4)
    assert built == [1]  # another seed is another base
    w3 = load_file(f"{other}/model.safetensors")
    assert not torch.equal(w1["qa_outputs.weight"], w3["qa_outputs.weight"])
