"""Report tables: run selection, every table's cells, the renderers and the written files, on hand-built runs."""
from __future__ import annotations

import csv
import io

import pandas as pd
import pytest

from hpml.errors import HpmlError, UsageError
from hpml.report import study
from hpml.report.tables import (
    MISSING, EmptyReportError, Table, build_report, render_all, select_runs, table1_configurations,
    table2_a_series, table3_b_series, table4_c_series, table5_vram, table7_statistics, table_sst2, to_csv, to_latex,
    to_markdown,
)
from hpml.tracking import (
    M_ACCURACY, M_DEVICE_TOTAL, M_EVAL_MS, M_EVAL_RUNTIME, M_EVAL_SPS, M_EXACT, M_F1, M_FULL_ARCH_PARAMS,
    M_MEM_ACTIVATIONS, M_MEM_GRADS, M_MEM_OPTIMIZER, M_MEM_PARAMS, M_PEAK_EVAL_VRAM, M_PEAK_TRAIN_ALLOC,
    M_PROBE_ALLOC, M_PROBE_RESERVED, M_TOTAL, M_TRAIN_LOSS, M_TRAIN_RUNTIME, M_TRAIN_SPS, M_TRAINABLE,
    M_VRAM_AFTER_LOAD, TAG_DEVICE, TAG_FINGERPRINT, TAG_PURPOSE, TAG_TASK, TAG_VARIANT,
)
from hpml.variants import CATALOG, get_variant

H100 = "NVIDIA H100 80GB HBM3"
T0 = pd.Timestamp("2025-03-01 12:00", tz="UTC")
_ = MISSING  # short, so expected rows read like the table


def run(run_id, task, variant, minute, metrics, status="FINISHED", purpose="real", device=H100):
    """One row shaped like mlflow.search_runs(output_format='pandas')."""
    row = {"run_id": run_id, "experiment_id": "1", "status": status,
           "start_time": T0 + pd.Timedelta(minutes=minute), "end_time": T0 + pd.Timedelta(minutes=minute + 5),
           f"tags.{TAG_TASK}": task, f"tags.{TAG_VARIANT}": variant, f"tags.{TAG_PURPOSE}": purpose,
           f"tags.{TAG_DEVICE}": device, f"tags.{TAG_FINGERPRINT}": f"fp-{task}",
           "tags.mlflow.runName": variant, "params.variant.optimizer.lr": "3e-05"}
    row.update({f"metrics.{k}": v for k, v in metrics.items() if v is not None})
    return row


def squad(em, f1, eval_s, eval_sps, loss, train_s, train_sps):
    return {M_EXACT: em, M_F1: f1, M_EVAL_RUNTIME: eval_s, M_EVAL_SPS: eval_sps, M_TRAIN_LOSS: loss,
            M_TRAIN_RUNTIME: train_s, M_TRAIN_SPS: train_sps}


def frame(rows):
    return pd.DataFrame(rows).sample(frac=1.0, random_state=3)  # search_runs order must not matter


@pytest.fixture()
def runs():
    return frame([
        run("a1-old", "squad", "a1", 0, squad(70.0, 74.0, 13.0, 170.0, 0.9, 950.0, 40.0)),
        run("a1-new", "squad", "a1", 10, squad(73.456, 76.994, 12.3456, 181.2, 0.7964, 900.1, 43.91)),
        run("a2-ok", "squad", "a2", 5, squad(73.1, 76.5, 14.0, 160.0, 0.8, 990.0, 41.0)),
        run("a2-failed", "squad", "a2", 20, squad(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0), status="FAILED"),
        run("a3-failed", "squad", "a3", 3, squad(9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0), status="FAILED"),
        run("a4nb", "squad", "a4-nb", 4, squad(73.8, 77.2, 8.0, 270.0, 0.79, 760.0, 51.6)),
        run("d1", "squad", "d1", 6, squad(73.0, 76.3, 13.5, 175.0, 0.793, 870.0, None)),  # no samp/s logged
        run("b1", "squad", "b1", 7, squad(51.0, 55.0, 16.0, 150.0, 1.94, 560.0, 70.4)),
        run("c1", "squad", "c1", 8, squad(72.6, 76.3, 15.0, 162.0, 0.81, 850.0, 46.0)),
        run("c2", "squad", "c2", 9, squad(70.9, 74.5, 15.5, 161.0, 0.82, 1060.0, 38.0)),
        run("p-a3", "vram", "a3", 11, {M_PROBE_ALLOC: 3000.04, M_PROBE_RESERVED: 3200.0, M_DEVICE_TOTAL: 81559.0,
                                       M_MEM_PARAMS: 420.0, M_MEM_GRADS: 420.0, M_MEM_OPTIMIZER: 840.0,
                                       M_MEM_ACTIVATIONS: 1300.56}),
        run("p-b3", "vram", "b3", 12, {M_PROBE_ALLOC: 2000.0, M_DEVICE_TOTAL: 81559.0}),
        run("p-c1", "vram", "c1", 13, {M_PROBE_ALLOC: 2400.0, M_PROBE_RESERVED: 2600.0, M_DEVICE_TOTAL: 81559.0}),
        run("fp32", "sst2", "fp32", 14, {M_TRAINABLE: 109483778, M_TOTAL: 109483778,
                                         M_FULL_ARCH_PARAMS: 109483778, M_TRAIN_RUNTIME: 875.4,
                                         M_PEAK_TRAIN_ALLOC: 2526.11, M_ACCURACY: 0.916284, M_EVAL_MS: 7.59691,
                                         M_VRAM_AFTER_LOAD: 420.99, M_PEAK_EVAL_VRAM: 1513.67}),
        # 4-bit tensors undercount total_params; the table divides by the full architecture's count
        run("qlora", "sst2", "qlora", 15, {M_TRAINABLE: 591362, M_TOTAL: 66000000, M_FULL_ARCH_PARAMS: 109483778,
                                           M_TRAIN_RUNTIME: 453.0, M_PEAK_TRAIN_ALLOC: 1638.87,
                                           M_ACCURACY: 0.90596, M_EVAL_MS: 3.25024, M_VRAM_AFTER_LOAD: 99.0,
                                           M_PEAK_EVAL_VRAM: 1124.68}),
        run("lora-running", "sst2", "lora", 16, {M_ACCURACY: 0.5}, status="RUNNING"),
        run("report", "report", "all", 17, {}),
    ])


# ---- selection ---------------------------------------------------------------------------------------
def test_select_keeps_newest_finished_run_per_task_and_variant(runs):
    chosen = select_runs(runs)
    ids = set(chosen["run_id"])
    assert "a1-new" in ids and "a1-old" not in ids
    assert "a2-ok" in ids and "a2-failed" not in ids and "a3-failed" not in ids and "lora-running" not in ids
    assert chosen.groupby([f"tags.{TAG_TASK}", f"tags.{TAG_VARIANT}"]).size().max() == 1
    assert set(chosen["status"]) == {"FINISHED"}


def test_select_filters_on_tags_before_picking_the_newest(runs):
    demo = run("a1-demo", "squad", "a1", 30, squad(5.0, 6.0, 1.0, 1.0, 1.0, 1.0, 1.0), purpose="demo")
    df = pd.concat([runs, pd.DataFrame([demo])], ignore_index=True)
    assert select_runs(df).set_index(f"tags.{TAG_VARIANT}").loc["a1", "run_id"] == "a1-demo"
    real = select_runs(df, {TAG_PURPOSE: "real"})
    assert real.set_index(f"tags.{TAG_VARIANT}").loc["a1", "run_id"] == "a1-new"
    assert select_runs(df, {f"tags.{TAG_PURPOSE}": "demo"})["run_id"].tolist() == ["a1-demo"]
    assert select_runs(df, {"no_such_tag": "x"}).empty


def test_select_handles_search_runs_empty_shapes():
    assert select_runs(pd.DataFrame()).empty
    assert select_runs(None).empty
    # runs exist but none carries hpml's tags (another project's experiment)
    foreign = pd.DataFrame([{"run_id": "x", "status": "FINISHED", "start_time": T0}])
    assert select_runs(foreign).empty


# ---- the tables, cell by cell ------------------------------------------------------------------------
SQUAD_COLUMNS = ["ID", "model", "seeds", "EM", "EM (study, T4)", "F1", "F1 ±95%", "F1 (study, T4)", "T_eval s",
                 "eval samp/s", "train loss", "T_train s", "train samp/s", "train samp/s ±95%", "device"]


def widen(row, at=1):
    """A row in the study's column order, widened by hpml's columns: model and seeds after the ID (and key
    knobs), the ±95% half-widths after F1 and train samp/s (— for these one-seed runs)."""
    measured = row[at + 0] != _
    head, (em, em_s, f1, f1_s, t_eval, eval_sps, loss, t_train, train_sps, device) = row[:at], row[at:]
    return [*head, _, "1" if measured else _, em, em_s, f1, _, f1_s, t_eval, eval_sps, loss, t_train, train_sps, _,
            device]
SEEDS_NOTE = ("Measured numbers are means over the seeds column's runs (the newest run's recipe: same configuration "
              "and data, newest run per seed); ±95% is the half-width of the 95% t-interval of the mean, — below 2 "
              "seeds. Table 7 has std, intervals and differences to each baseline.")
STUDY_NOTE = ("Columns marked “(study, T4)” are the source study's published numbers, measured on one NVIDIA T4; "
              "all other numbers were measured by hpml on the device in the `device` column, so compare ratios "
              "between variants, not absolute times.")


def test_table1_lists_the_whole_catalog():
    t = table1_configurations()
    assert t.name == "table1_configurations"
    assert list(t.frame.columns) == ["ID", "study label", "task", "description", "key knobs", "requires CUDA"]
    assert t.frame["ID"].tolist() == [v.id for v in CATALOG]
    rows = t.frame.set_index("ID")
    a4nb = get_variant("a4-nb")
    assert rows.loc["a4-nb"].tolist() == ["A4-nb", "squad", a4nb.description, a4nb.knobs(), "no"]
    assert rows.loc["c1", "requires CUDA"] == "yes" and rows.loc["qlora", "requires CUDA"] == "yes"
    assert rows.loc["fp32", "study label"] == "BERT FP32"
    assert rows.loc["bf16", "study label"] == MISSING
    assert "p0, p1, p2, bf16, lora, mnli-full, mnli-lora: hpml additions, in neither study (study label —)." in t.footnotes


def test_table2_a_series(runs):
    t = table2_a_series(runs)
    assert t.name == "table2_a_series"
    assert list(t.frame.columns) == SQUAD_COLUMNS
    assert t.frame.values.tolist() == [widen(r) for r in [
        ["A1", "73.46", "73.21", "76.99", "76.62", "12.35", "181.20", "0.796", "900.10", "43.91", H100],
        ["A2", "73.10", "73.26", "76.50", "76.56", "14.00", "160.00", "0.800", "990.00", "41.00", H100],
        ["A3", _, "73.37", _, "76.89", _, _, _, _, _, _],  # only a FAILED run: never enters
        ["A4-nb", "73.80", "73.78", "77.20", "77.23", "8.00", "270.00", "0.790", "760.00", "51.60", H100],
        ["A4-b", _, "25.82", _, "26.87", _, _, _, _, _, _],
        ["D1", "73.00", "73.04", "76.30", "76.35", "13.50", "175.00", "0.793", "870.00", _, H100],
    ]]
    assert t.footnotes == [
        STUDY_NOTE,
        "EM and F1 in percent on the SQuAD v2 dev set; samp/s counts features (context windows), not questions.",
        SEEDS_NOTE,
        "A4-b was the study's failed ablation: length bucketing broke its accuracy (study EM 25.82).",
        "A3, A4-b: no FINISHED run found; measured cells show —.",
    ]


def test_table3_b_series(runs):
    t = table3_b_series(runs)
    assert list(t.frame.columns) == SQUAD_COLUMNS
    assert t.frame.values.tolist() == [widen(r) for r in [
        ["B1", "51.00", "51.12", "55.00", "54.95", "16.00", "150.00", "1.940", "560.00", "70.40", H100],
        ["B2", _, "54.61", _, "58.00", _, _, _, _, _, _],
        ["B3", _, "68.21", _, "71.99", _, _, _, _, _, _],
    ]]
    assert "B2, B3: no FINISHED run found; measured cells show —." in t.footnotes


def test_table4_c_series_has_key_knobs(runs):
    t = table4_c_series(runs)
    assert list(t.frame.columns) == ["ID", "key knobs", *SQUAD_COLUMNS[1:]]
    knobs = {vid: get_variant(vid).knobs() for vid in ("c1", "c2-8", "c2")}
    assert t.frame.values.tolist() == [widen(r, at=2) for r in [
        ["C1", knobs["c1"], "72.60", "72.64", "76.30", "76.27", "15.00", "162.00", "0.810", "850.00", "46.00", H100],
        ["C2-8", knobs["c2-8"], _, "72.67", _, "76.14", _, _, _, _, _, _],
        ["C2", knobs["c2"], "70.90", "70.85", "74.50", "74.53", "15.50", "161.00", "0.820", "1060.00", "38.00",
         H100],
    ]]
    assert "C2-8: no FINISHED run found; measured cells show —." in t.footnotes


def test_table5_vram_one_row_per_probed_variant_plus_the_study_three(runs):
    t = table5_vram(runs)
    assert list(t.frame.columns) == [
        "ID", "peak allocated MiB", "peak allocated MiB (study, T4)", "peak reserved MiB",
        "peak reserved MiB (study, T4)", "device total MiB", "params MiB", "grads MiB", "optimizer MiB",
        "activations MiB", "device"]
    assert t.frame.values.tolist() == [
        ["A3", "3000.0", "3087.0", "3200.0", "3256.0", "81559.0", "420.0", "420.0", "840.0", "1300.6", H100],
        ["B3", "2000.0", _, _, _, "81559.0", _, _, _, _, H100],
        ["C1", "2400.0", "2465.9", "2600.0", "2720.0", "81559.0", _, _, _, _, H100],
        ["C2", _, "2100.2", _, "2344.0", _, _, _, _, _, _],
    ]
    assert "C2: no FINISHED run found; measured cells show —." in t.footnotes


def test_table5_drops_breakdown_columns_when_no_probe_logged_them(runs):
    no_split = runs[runs["run_id"] != "p-a3"]
    t = table5_vram(no_split)
    assert list(t.frame.columns) == [
        "ID", "peak allocated MiB", "peak allocated MiB (study, T4)", "peak reserved MiB",
        "peak reserved MiB (study, T4)", "device total MiB", "device"]
    assert t.frame.iloc[0].tolist() == ["A3", _, "3087.0", _, "3256.0", _, _]


def test_table_sst2(runs):
    t = table_sst2(runs)
    assert t.name == "table6_sst2"
    assert list(t.frame.columns) == [
        "ID", "model", "seeds", "trainable params", "total params", "trainable %", "train min", "peak train VRAM MiB",
        "val acc", "val acc ±95%", "val acc (study, T4)", "val acc per epoch (study, T4)", "latency ms/sample",
        "VRAM after load MiB", "peak eval VRAM MiB", "device"]
    assert t.frame.values.tolist() == [
        ["fp32", _, "1", "109483778", "109483778", "100", "14.59", "2526.1", "0.9163", _, "0.9163", "0.9025 → 0.9163",
         "7.5969", "421.0", "1513.7", H100],
        ["bf16", _, _, _, _, _, _, _, _, _, _, _, _, _, _, _],
        ["lora", _, _, _, _, _, _, _, _, _, _, _, _, _, _, _],  # its only run is still RUNNING
        ["qlora", _, "1", "591362", "109483778", "0.54", "7.55", "1638.9", "0.9060", _, "0.9060", "0.8933 → 0.9060",
         "3.2502", "99.0", "1124.7", H100],
    ]
    assert "bf16, lora: no FINISHED run found; measured cells show —." in t.footnotes
    assert "bf16, lora: hpml additions; study 2 has no numbers for them." in t.footnotes


def seeded(run_id, variant, minute, seed, f1, sps, recipe="r1"):
    row = run(run_id, "squad", variant, minute, squad(f1 - 3.0, f1, 1.0, 100.0, 0.5, 10.0, sps))
    row.update({"tags.recipe_hash": f"{variant}-{recipe}", "params.resolved.seed": str(seed),
                "params.model": "random:tiny"})
    return row


def test_seed_repeats_give_means_intervals_and_differences_to_the_baseline():
    import math

    from scipy import stats as sps

    df = frame([
        seeded("a2-s42", "a2", 1, 42, 76.0, 40.0),
        seeded("a2-s43", "a2", 2, 43, 77.0, 42.0),
        seeded("a2-s44-old", "a2", 3, 44, 10.0, 1.0),  # the same seed again later: only the newer counts
        seeded("a2-s44", "a2", 4, 44, 78.0, 44.0),
        seeded("a2-r0", "a2", 0, 45, 50.0, 9.0, recipe="r0"),  # an older recipe (other config/data): not counted
        seeded("a1-s42", "a1", 5, 42, 76.5, 30.0),
        seeded("a1-s43", "a1", 6, 43, 77.5, 31.0),
        seeded("a4-s42", "a4-nb", 7, 42, 70.0, 60.0),
    ])
    t2 = table2_a_series(df)
    a2 = dict(zip(t2.frame.columns, t2.frame.values.tolist()[1]))
    assert (a2["ID"], a2["model"], a2["seeds"], a2["F1"], a2["train samp/s"]) == ("A2", "random:tiny", "3", "77.00",
                                                                                  "42.00")
    assert a2["F1 ±95%"] == f"{sps.t.ppf(0.975, 2) / math.sqrt(3):.2f}" == "2.48"  # std 1 over 3 seeds

    rows = {(r["ID"], r["metric"]): r for r in table7_statistics(df).frame.to_dict("records")}
    assert rows[("A2", "F1")]["verdict"] == "baseline" and rows[("A2", "F1")]["std"] == "1.00"
    same = rows[("A1", "F1")]  # 77.0 vs 77.0: the interval straddles 0
    assert (same["mean"], same["diff"], same["verdict"]) == ("77.00", "0.00", "within noise")
    slower = rows[("A1", "train samp/s")]
    ci = sps.ttest_ind([30.0, 31.0], [40.0, 42.0, 44.0], equal_var=False).confidence_interval(0.95)
    assert (slower["diff"], slower["diff CI95 low"], slower["diff CI95 high"]) == (
        "-11.50", f"{ci.low:.2f}", f"{ci.high:.2f}")
    assert slower["verdict"] == "lower" and ci.high < 0
    one = rows[("A4-nb", "F1")]
    assert (one["seeds"], one["std"], one["CI95 low"], one["verdict"]) == ("1", _, _, "one seed: no interval")
    assert not any(k[0].startswith("B") for k in rows)  # no B run: Table 3 has no rows, not even its baseline


def test_study_numbers_cover_the_catalog_and_agree_with_each_other():
    # (Comparing each transcribed constant with the same literal again could not fail; these can.)
    assert set(study.SQUAD_RESULTS) == {v.id for v in CATALOG if v.task == "squad" and v.study_id}
    assert set(study.SST2_RESULTS) <= {v.id for v in CATALOG if v.task == "sst2"}
    for r in study.SQUAD_RESULTS.values():
        assert r.f1 >= r.em  # F1 gives partial credit, so it is never below EM


def test_small_data_and_mixed_runs_are_flagged(runs):
    demo = runs.assign(**{f"tags.{TAG_PURPOSE}": "demo"})
    assert ("Measured rows come from purpose=demo runs (small or synthetic data), not full-data 'real' runs: "
            "the study's numbers are not comparable to them.") in table2_a_series(demo).footnotes
    mixed = runs.copy()
    mixed.loc[mixed["run_id"] == "a2-ok", f"tags.{TAG_PURPOSE}"] = "test"
    notes = table2_a_series(mixed).footnotes
    assert any(n.startswith("Rows mix runs of purpose real, test") for n in notes)
    assert not any("purpose" in n for n in table2_a_series(runs).footnotes)


def test_build_report_order(runs):
    tables = build_report(runs)
    assert [t.name for t in tables] == ["table1_configurations", "table2_a_series", "table3_b_series",
                                        "table4_c_series", "table5_vram", "table6_sst2", "table7_statistics"]
    # the filter reaches the tables: with purpose=test nothing matches but one run
    test_run = run("a2-test", "squad", "a2", 40, squad(5.0, 6.0, 1.0, 1.0, 1.0, 1.0, 1.0), purpose="test")
    df = pd.concat([runs, pd.DataFrame([test_run])], ignore_index=True)
    filtered = build_report(df, {TAG_PURPOSE: "test"})[1].frame
    assert filtered["EM"].tolist() == [_, "5.00", _, _, _, _]


@pytest.mark.parametrize("df", [
    pd.DataFrame(),
    pd.DataFrame([run("f", "squad", "a1", 0, {M_F1: 1.0}, status="FAILED")]),
    pd.DataFrame([run("r", "report", "all", 0, {})]),
])
def test_no_finished_hpml_run_is_a_clear_one_line_error(df):
    with pytest.raises(EmptyReportError) as err:
        build_report(df, tracking_uri="http://127.0.0.1:5000")
    message = str(err.value)
    assert isinstance(err.value, HpmlError)
    assert "\n" not in message
    assert message.startswith("no FINISHED hpml runs found at http://127.0.0.1:5000;")
    assert "mlflow run . -e train_squad" in message


def test_empty_error_names_the_filter(runs):
    with pytest.raises(EmptyReportError, match="with purpose=nope"):
        build_report(runs, {TAG_PURPOSE: "nope"})


# ---- renderers ---------------------------------------------------------------------------------------
def small_table():
    df = pd.DataFrame({"ID": ["A1", "B|2"], "EM": ["73.50", MISSING], "device": ["H100", MISSING]})
    return Table("table9_small", "Table 9: small", df, ["first note", "second note"])


def test_markdown_renderer_exact_output():
    assert to_markdown(small_table()) == (
        "### Table 9: small\n"
        "\n"
        "| ID   |    EM | device |\n"
        "|------|------:|--------|\n"
        "| A1   | 73.50 | H100   |\n"
        "| B\\|2 |     — | —      |\n"
        "\n"
        "- first note\n"
        "- second note\n"
    )


def test_markdown_of_a_real_table_has_one_line_per_row(runs):
    text = to_markdown(table2_a_series(runs))
    lines = text.splitlines()
    assert lines[0] == "### Table 2: SQuAD v2, A series (attention, compile, batching) and D1"
    assert lines[2].startswith("| ID    | model | seeds |    EM | EM (study, T4) |")
    assert lines[4] == ("| A1    | —     |     1 | 73.46 |          73.21 | 76.99 |       — |          76.62 |    12.35 |"
                        "      181.20 |      0.796 |    900.10 |        43.91 |                 — | NVIDIA H100 80GB HBM3 |")
    assert sum(1 for ln in lines if ln.startswith("| ")) == 1 + 6


def test_latex_escapes_special_characters():
    df = pd.DataFrame({"a_b": ["x & y", "50%"], "#": ["a_1", MISSING]})
    tex = to_latex(Table("t", "T_1 & co: 100% #1", df, ["see $x$ {y} ~z"]))
    assert tex == (
        "\\begin{table}[ht]\n"
        "\\centering\n"
        "\\caption{T\\_1 \\& co: 100\\% \\#1}\n"
        "\\begin{tabular}{rr}\n"
        "\\hline\n"
        "a\\_b & \\# \\\\\n"
        "\\hline\n"
        "x \\& y & a\\_1 \\\\\n"
        "50\\% & --- \\\\\n"
        "\\hline\n"
        "\\end{tabular}\n"
        "\\par\\footnotesize\n"
        "see \\$x\\$ \\{y\\} \\textasciitilde{}z\\par\n"
        "\\end{table}\n"
    )


def test_csv_number_columns_hold_only_numbers(runs):
    t = table_sst2(runs)
    back = list(csv.reader(io.StringIO(to_csv(t))))
    assert back[0] == list(t.frame.columns)
    text = {"ID", "model", "val acc per epoch (study, T4)", "device"}
    for row in back[1:]:
        for column, cell in zip(back[0], row):
            if column not in text and cell != "":
                float(cell)  # every number column parses; — is written empty
    assert back[1][:6] == ["fp32", "—", "1", "109483778", "109483778", "100"]
    assert back[2] == ["bf16", "—", "", "", "", "", "", "", "", "", "", "—", "", "", "", "—"]


def test_render_all_writes_the_requested_files(runs, tmp_path):
    tables = build_report(runs)
    paths = render_all(tables, "md,csv,tex", tmp_path / "out")
    names = [p.name for p in paths]
    assert names[0] == "report.md"
    assert sorted(names[1:]) == sorted(f"{t.name}.{ext}" for t in tables for ext in ("csv", "tex"))
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert report.splitlines()[0] == "# hpml report"
    assert report.splitlines()[2] == (
        "Study numbers (columns marked “(study, T4)”) were measured by the source studies on one NVIDIA T4; "
        f"hpml's numbers were measured on {H100} (each row's `device` column).")
    assert report.count("### Table ") == 7
    assert (tmp_path / "out" / "table2_a_series.csv").read_text(encoding="utf-8") == to_csv(tables[1])

    only_csv = render_all(tables, ["csv"], tmp_path / "csv")
    assert [p.suffix for p in only_csv] == [".csv"] * 7
    with pytest.raises(UsageError, match="pdf"):
        render_all(tables, "md,pdf", tmp_path / "bad")
