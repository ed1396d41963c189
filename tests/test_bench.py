"""hpml bench on CPU: the reference row first, one row per variant and token budget, logged as task=bench."""
from click.testing import CliRunner
from mlflow import MlflowClient

from hpml import tracking
from hpml.cli import main

TINY = ["--model", "random:tiny", "--steps", "2", "--warmup-steps", "1", "--features", "24", "--eval-features", "12",
        "--max-length", "128", "--batch-size", "4", "--eval-batch-size", "8", "--eval-max-tokens", "512",
        "--purpose", "test"]


def test_bench_prints_and_logs_one_row_per_variant_and_budget(tracking_uri):
    out = CliRunner().invoke(main, ["bench", "--variants", "a2,p0", "--max-tokens", "512", *TINY])
    assert out.exit_code == 0, out.output
    table = [line for line in out.output.splitlines() if line.startswith("| ")]
    final = [line.split("|")[1].strip() for line in table[-3:]]
    assert final == ["reference", "a2", "p0@512"]
    assert table[-3].split("|")[-2].strip() == "1.00"  # the reference's ratio to itself
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("hpml-bench").experiment_id])
    rows = {r.data.tags["bench_row"]: r for r in runs if "bench_row" in r.data.tags}
    assert sorted(rows) == ["a2", "p0@512", "reference"]
    for r in runs:
        assert r.data.tags[tracking.TAG_TASK] == "bench" and r.info.status == "FINISHED"
    for label, r in rows.items():
        m = r.data.metrics
        assert m["bench_train_features_per_s"] > 0 and m["bench_eval_features_per_s"] > 0
        assert m["bench_recompiles_after_warmup"] == 0
    assert rows["reference"].data.metrics["bench_ratio_to_reference"] == 1.0
    # packed rows carry (almost) no padding; the reference pads every feature to 128
    assert rows["p0@512"].data.metrics["bench_padded_share"] < 0.2 < rows["reference"].data.metrics["bench_padded_share"]


def test_bench_bad_token_budget_is_one_line_and_logs_nothing(tracking_uri):
    out = CliRunner().invoke(main, ["bench", "--variants", "p0", "--max-tokens", "64", *TINY])
    assert out.exit_code != 0
    assert out.output.strip().splitlines() == ["hpml: error: max_tokens 64 is below max_length 128: a full window must fit"]
    assert MlflowClient(tracking_uri).get_experiment_by_name("hpml-bench") is None


def test_speed_table_shows_the_newest_bench_run_rows_in_order():
    import pandas as pd

    from hpml.report.tables import table_speed

    def row(parent, label, start, ratio, status="FINISHED"):
        return {"run_id": f"{parent}-{label}", "status": status, "start_time": start, "tags.task": "bench",
                "tags.bench_row": label, "tags.variant": label.split("@")[0], "tags.purpose": "real",
                "tags.mlflow.parentRunId": parent, "tags.device": "NVIDIA H100 80GB HBM3",
                "metrics.bench_train_features_per_s": 400 * ratio, "metrics.bench_ratio_to_reference": ratio}

    df = pd.DataFrame([row("old", "reference", 1, 1.0), row("old", "a2", 2, 1.3),
                       row("new", "reference", 10, 1.0), row("new", "p2@6000", 11, 4.95),
                       row("new", "p2@32768", 12, 6.54), row("new", "a3", 13, 2.0, status="FAILED"),
                       {"run_id": "x", "status": "FINISHED", "start_time": 14, "tags.task": "squad"}])
    table = table_speed(df)
    assert list(table.frame["row"]) == ["reference", "p2@6000", "p2@32768"]
    assert list(table.frame["× reference"]) == ["1.00", "4.95", "6.54"]
    assert table.frame["features/s"].iloc[-1] == "2616"
    assert table_speed(df, {"purpose": "test"}) is None and table_speed(df[df["tags.task"] == "squad"]) is None


def test_cudagraphs_rows_twin_only_compiled_padded_variants_in_mode_reduce_overhead():
    from hpml.bench import cudagraph_twin, with_cudagraphs
    from hpml.variants import get_variant, variants_for

    twins = sorted(v.id for v in variants_for("squad") if cudagraph_twin(v))
    # compiled with inductor, padded, not already in CUDA graphs: not a1/a2 (eager), d1 (aot_eager), p1/p2 (packed)
    assert {"a3", "a4-nb", "a4-b", "b3"} <= set(twins) and not {"a1", "a2", "d1", "p1", "p2"} & set(twins)
    cg = with_cudagraphs(get_variant("a4-b", "squad"))
    assert (cg.compile.mode, cg.batching.group_by_length, cg.batching.pad_to_multiple_of) == ("reduce-overhead", True, 64)
    assert "cudagraphs" in cg.knobs() and "bucketed" in cg.knobs()


def test_static_widths_rows_twin_only_compiled_pad_to_longest_variants():
    from hpml.modeling import dynamic_widths
    from hpml.variants import variants_for

    twins = sorted(v.id for v in variants_for("squad") if dynamic_widths(v))
    assert twins == ["a4-b", "a4-nb"]  # a3/b3 pad to max_length (one shape), a2 is not compiled, p* are packed
    bad = CliRunner().invoke(main, ["bench", "--variants", "a2", "--static-widths", "maybe", *TINY])
    assert bad.exit_code != 0 and bad.output.strip().splitlines()[-1].startswith("hpml: error: static_widths")


def test_bench_cudagraphs_adds_no_row_for_uncompiled_or_packed_variants(tracking_uri):
    out = CliRunner().invoke(main, ["bench", "--variants", "a2,p0", "--max-tokens", "512", "--cudagraphs", "true",
                                    "--log", "false", *TINY])
    assert out.exit_code == 0, out.output
    final = [line.split("|")[1].strip() for line in out.output.splitlines() if line.startswith("| ")][-3:]
    assert final == ["reference", "a2", "p0@512"]
    bad = CliRunner().invoke(main, ["bench", "--variants", "a2", "--cudagraphs", "maybe", *TINY])
    assert bad.exit_code != 0 and bad.output.strip().splitlines()[-1].startswith("hpml: error: cudagraphs")
