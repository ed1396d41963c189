"""The report command: runs on a tracking server in, tables and plots out, logged as a `report` run."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from hpml import tracking
from hpml.errors import UsageError


def _echo_err(line: str) -> None:
    print(line, file=sys.stderr)


def run_report(tracking_uri: str, out: str, formats: str, experiments: str, purpose: str, series_run: str = "", *,
               echo: Callable[[str], None] = print, note: Callable[[str], None] = _echo_err) -> list[Path]:
    """Query the store, write the tables (`formats`) and plots under `out`, print the Markdown report on
    `echo` (stdout: it pipes cleanly) and progress on `note` (stderr), then log every written file as an
    artifact of a run named `report` (experiment hpml-report, or the run `mlflow run` created).

    Nothing is logged before the report exists: an empty store ends in EmptyReportError with no run left.
    Returns the files written, tables first, then plots.
    """
    # Imported here: pandas and matplotlib cost seconds, and `hpml --help` should not pay them.
    from hpml.report.plots import PLOT_FILES, make_plots
    from hpml.report.tables import (RUN_TASKS, _parse_formats, build_report, finished_runs, render_all,
                                    report_markdown)

    chosen = _parse_formats(formats)  # a bad format fails before any network call
    purpose = (purpose or "").strip().lower()
    if purpose and purpose not in tracking.PURPOSES:
        raise UsageError(f"purpose must be empty or one of {', '.join(tracking.PURPOSES)}, got {purpose!r}")
    if not str(out or "").strip():
        raise UsageError("out must name a folder for the report, e.g. --out report")
    names = [n.strip() for n in (experiments or "").split(",") if n.strip()]

    uri = tracking.connect(tracking_uri, experiment=tracking.DEFAULT_EXPERIMENT["report"])
    df = tracking.search_runs(names or None)
    task_col = f"tags.{tracking.TAG_TASK}"
    # Runs are found by tag, not experiment: keep training and probe runs, drop ours and foreign ones.
    df = df[df[task_col].isin(RUN_TASKS)] if task_col in df.columns else df.iloc[0:0]
    if series_run:  # a series' report: its own children only
        parent_col = f"tags.{tracking.TAG_PARENT}"
        df = df[df[parent_col] == series_run] if parent_col in df.columns else df.iloc[0:0]
    tag_filter = {tracking.TAG_PURPOSE: purpose} if purpose else None
    tables = build_report(df, tag_filter, tracking_uri=uri)  # EmptyReportError when nothing matches

    out_dir = Path(out)
    written = render_all(tables, chosen, out_dir)
    plots = make_plots(finished_runs(df, tag_filter), out_dir)  # seed repeats too: error bars
    echo(report_markdown(tables))
    made = {p.name for p in plots}
    skipped = [name for name in PLOT_FILES.values() if name not in made]
    if skipped:
        note(f"skipped plots (no runs with their metrics): {', '.join(skipped)}")

    inputs = {"tracking_uri": tracking_uri, "out": out, "formats": formats, "experiments": experiments,
              "purpose": purpose, "series_run": series_run}
    resolved = {"resolved.tracking_uri": uri, "resolved.formats": ",".join(chosen),
                "resolved.experiments": ",".join(names) or "(all)", "resolved.purpose": purpose or "(all)"}
    files = written + plots
    with tracking.run("report", tracking.REPORT_RUN_NAME, "", {}, inputs, resolved) as run_id:
        tracking.log_files([str(p) for p in files])
    note(f"wrote {len(files)} files to {out_dir}; logged as artifacts of run {run_id} at {uri}")
    return files
