"""The catalog: every study ID, case-insensitive look-up, rejected combinations, the `variants` command."""
import re

import pytest

from hpml.errors import UsageError
from hpml.variants import CATALOG, Lora, Memory, Trainable, Variant, get_variant, variants_for

STUDY1 = ["a1", "a2", "a3", "a4-nb", "a4-b", "b1", "b2", "b3", "c1", "c2-8", "c2", "d1"]


def test_catalog_has_every_study_id_once():
    assert [v.id for v in variants_for("squad")] == STUDY1 + ["p0", "p1", "p2"]  # + packed, beyond the study
    assert [v.id for v in variants_for("sst2")] == ["fp32", "bf16", "lora", "qlora"]
    assert all(v.description for v in CATALOG)


@pytest.mark.parametrize("given,expected", [("B3", "b3"), ("A4-NB", "a4-nb"), (" c2-8 ", "c2-8"), ("QLoRA", "qlora")])
def test_lookup_is_case_insensitive(given, expected):
    assert get_variant(given).id == expected


def test_study_recipes():
    assert get_variant("b2").optimizer.lr == 1e-3 and get_variant("b2").trainable.mode == "bias"
    assert not get_variant("b2").compile.enabled
    b3 = get_variant("b3")
    assert (b3.optimizer.lr, b3.trainable.mode, b3.compile.enabled) == (5e-5, "freeze_lower", True)
    assert get_variant("d1").compile.backend == "aot_eager" and get_variant("d1").optimizer.lr == 3e-5
    q = get_variant("qlora")
    assert (q.precision.quantization, q.precision.dtype, q.optimizer.lr) == ("nf4", "fp16", 2e-4)
    assert (q.trainable.lora.r, q.trainable.lora.alpha, q.trainable.lora.targets) == (16, 32, ("query", "value"))
    assert get_variant("fp32").optimizer.lr == 2e-5 and get_variant("fp32").precision.dtype == "fp32"
    assert get_variant("a4-b").batching.group_by_length and not get_variant("a4-nb").batching.group_by_length
    assert [v.id for v in CATALOG if v.requires_cuda] == ["c1", "c2-8", "qlora"]


def test_unknown_or_wrong_task_variant_lists_valid_ones():
    with pytest.raises(UsageError, match="unknown variant 'zz'.*valid: a1, a2"):
        get_variant("zz", "squad")
    with pytest.raises(UsageError, match="for task sst2; valid: fp32, bf16, lora, qlora"):
        get_variant("b3", "sst2")


def test_impossible_combinations_are_rejected_at_build_time():
    with pytest.raises(ValueError, match="variant 'x'.*LoRA options"):
        Variant("x", "sst2", "d", trainable=Trainable("lora"))
    with pytest.raises(ValueError, match="variant 'y'.*freeze_fraction"):
        Variant("y", "sst2", "d", trainable=Trainable("freeze_lower", freeze_fraction=1.5))
    with pytest.raises(ValueError, match="lower-case"):
        Variant("Z", "sst2", "d", trainable=Trainable("lora", lora=Lora()))


def test_variants_command_and_unknown_variant_exit_code(sst2_dir, tracking_uri):
    from click.testing import CliRunner

    from hpml.cli import main

    out = CliRunner().invoke(main, ["variants", "--task", "squad"])
    assert out.exit_code == 0 and out.output.splitlines()[0].startswith("a1 ")
    assert re.search(r"^c1 +squad +cuda +8-bit AdamW", out.output, re.M)
    bad = CliRunner().invoke(main, ["train-sst2", "--variant", "nope", "--model", "random:tiny", "--data-dir",
                                    str(sst2_dir)])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "hpml: error: unknown variant 'nope' for task sst2; valid: fp32, bf16, lora, qlora"


def test_freezing_with_reentrant_checkpointing_is_rejected():
    with pytest.raises(ValueError, match="reentrant gradient checkpointing trains nothing above the frozen"):
        Variant("z", "squad", "d", trainable=Trainable("freeze_lower", freeze_fraction=0.5),
                memory=Memory(gradient_checkpointing=True, reentrant=True))
    Variant("z", "squad", "d", trainable=Trainable("freeze_lower", freeze_fraction=0.5),
            memory=Memory(gradient_checkpointing=True))  # non-reentrant (the default) is fine
