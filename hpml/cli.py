"""The `hpml` command line: thin click commands that parse options, look up the variant and call hpml."""
from __future__ import annotations

import functools
import json
import os
import sys

import click

from hpml.config import (BENCH_PARAMS, REPORT_PARAMS, SERIES_PARAMS, VRAM_PARAMS, Param, TrainConfig,
                         small_run_note)
from hpml.tasks import all_tasks, get_task, task_names
from hpml.errors import HpmlError

TYPES = {"string": str, "int": int, "float": float}


def options(params: list[Param]):
    """Turn the declared parameters into click options (one declaration feeds CLI and the MLproject test)."""

    def wrap(f):
        for p in reversed(params):
            opt = "--" + p.name.replace("_", "-")
            f = click.option(opt, p.name, type=TYPES[p.type], default=p.default, required=p.default is None,
                             show_default=p.default not in (None, ""), help=p.help)(f)
        return f

    return wrap


def one_line_errors(f):
    """User errors end as one line on stderr and a non-zero exit, never a traceback."""

    from hpml import signals

    @functools.wraps(f)
    def run(*args, **kwargs):
        try:
            with signals.handled():
                return f(*args, **kwargs)
        except HpmlError as exc:
            from hpml import launch

            if not launch.in_worker():  # a data-parallel worker's error is reported once, by its launcher
                click.echo(f"hpml: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except signals.Interrupted as exc:
            click.echo(f"hpml: {exc}: the run (if one started) ended KILLED and nothing was registered; "
                       "hpml resume latest continues it from its last checkpoint", err=True)
            sys.exit(exc.exit_code)

    return run


def parse_bool(name: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v not in ("true", "false", "1", "0", "yes", "no"):
        raise HpmlError(f"{name} must be true or false, got {value!r}")
    return v in ("true", "1", "yes")


def parse_lr(value: str):
    if value in ("", None):
        return None
    try:
        return float(value)
    except ValueError:
        raise HpmlError(f"lr must be a number or empty (the variant's own), got {value!r}") from None


class OneLineGroup(click.Group):
    """Click's own usage errors (a bad integer, an unknown option) as one line too: click prints the usage,
    a hint and the error on three or more lines."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare `hpml`: the help text is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            where = getattr(getattr(exc, "ctx", None), "command_path", None) or "hpml"
            click.echo(f"hpml: error: {exc.format_message()} ({where} -h lists the options)", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("hpml: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """hpml: efficient fine-tuning of BERT on SQuAD v2 and SST-2, measured and compared in MLflow."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("MLFLOW_RUN_ID"):  # started by `mlflow run`: end with it
        from hpml.signals import die_with_parent

        die_with_parent()


@main.command("variants")
@click.option("--task", type=click.Choice(task_names()), default=None, help="only this task's variants")
def variants_cmd(task):
    """List the variant catalog: ID, task, CUDA need, description."""
    from hpml.variants import variants_for

    shown = variants_for(task)
    width = max(len(v.id) for v in shown)
    for v in shown:
        cuda = "cuda" if v.requires_cuda else "any "
        click.echo(f"{v.id:{width}} {v.task:6} {cuda}  {v.description}")


def _train(task: str, kw: dict):
    from hpml import launch, lean
    from hpml.errors import UsageError
    from hpml.variants import get_variant

    if not kw["variant"]:  # click lets a required option with a None default through as None
        raise UsageError(f"--variant is required: pick one of hpml variants --task {task}")
    variant = get_variant(kw["variant"], task)
    lean.hide_unused(variant)  # before transformers is imported: packages its training will not use stay out
    from hpml.training import run_training

    cfg = TrainConfig(task=task, **{**kw, "register": parse_bool("register", kw["register"]),
                                    "lr": parse_lr(kw["lr"])})
    # `resume` is not a param of the run: the resumed run keeps the params it was started with
    inputs = {k: "" if v is None else v for k, v in kw.items() if k != "resume"}
    if cfg.resume and cfg.nproc > 1:
        raise UsageError("resume continues single-process runs only: drop nproc (the run's own settings are used)")
    note = small_run_note(task, cfg.purpose, cfg.max_steps, cfg.max_train_samples)
    if note and not launch.in_worker():
        click.echo(f"hpml: note: {note}", err=True)
    if not launch.in_worker():
        launch.check(variant, cfg.nproc, cfg.batch_size, cfg.eval_batch_size)
    if cfg.nproc > 1 and not launch.in_worker():
        # The workers run this same command; they find themselves inside the job and train.
        argv = [f"train-{task}"] + [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", "" if v is None else str(v))]
        launch.launch(argv, cfg.nproc)
        return
    if launch.in_worker():
        launch.quiet_other_ranks()
        try:
            summary = run_training(cfg, inputs=inputs)
        except BaseException as exc:
            from hpml import signals

            # A signal is the agent stopping this worker because another failed: not a cause of its own.
            if not isinstance(exc, (signals.Interrupted, KeyboardInterrupt)):
                launch.record_error(str(exc) if isinstance(exc, HpmlError) else f"{type(exc).__name__}: {exc}")
            if launch.peer_lost(exc):  # another worker died mid-collective: the launcher names it, in one line
                raise HpmlError(f"a peer worker is gone ({str(exc).splitlines()[0]})") from None
            raise
        if not launch.context().is_main:
            return
    else:
        summary = run_training(cfg, inputs=inputs)
    _print_summary(task, summary)


def _print_summary(task: str, summary: dict):
    spec = get_task(task)
    m = summary["metrics"]
    shown = ", ".join(f"{k}={m[k]:.4g}" for k in spec.shown + ("train_runtime_s", "train_samples_per_s") if k in m)
    click.echo(f"run {summary['run_id']} ({summary['variant']}): {shown}")
    if "registered" in summary:
        champ = " (champion)" if summary["champion"] else ""
        click.echo(f"registered {summary['registered']} version {summary['version']}{champ}")


def _train_command(spec):
    """`hpml train-<task>`: its options are the task's declared parameters (spec.params)."""

    @options(list(spec.params))
    @one_line_errors
    def command(**kw):
        _train(spec.name, kw)

    command.__doc__ = (f"Fine-tune on {spec.title} with one variant; evaluate ({spec.headline}), log to MLflow "
                       "and register the model.")
    return main.command(spec.command)(command)


for _spec in all_tasks().values():
    _train_command(_spec)


@main.command("resume")
@click.argument("run", default="latest")
@one_line_errors
def resume(run):
    """Continue an interrupted training run (RUN ID, or 'latest') from its last checkpoint: same MLflow run,
    same parameters; it ends FINISHED and registers one version."""
    from hpml import checkpoints, lean, tracking
    from hpml.variants import get_variant

    tracking.connect()
    if run.strip().lower() != "latest":  # a run that trained to the end while its server was away
        from hpml import outage

        pending = outage.pending_of(tracking.run_info(run.strip())["tags"].get(tracking.TAG_CHECKPOINT_DIR, ""))
        if pending:
            click.echo(f"logging run {run.strip()}'s pending export {pending}", err=True)
            summary = outage.log_export(pending)
            _print_summary(summary.pop("task"), summary)
            return
    cfg = checkpoints.to_resume(run)
    lean.hide_unused(get_variant(cfg.variant, cfg.task))
    from hpml.training import run_training

    click.echo(f"resuming {cfg.task} run {cfg.resume} ({cfg.variant}) from "
               f"{checkpoints.last_checkpoint(checkpoints.run_dir(cfg, cfg.resume))}", err=True)
    _print_summary(cfg.task, run_training(cfg))


@main.command("log-export")
@click.argument("path")
@click.option("--tracking-uri", default="", help="the server to log to [default: the one the run used]")
@one_line_errors
def log_export_cmd(path, tracking_uri):
    """Log the export a run saved because its tracking server was away at its end (the folder its last
    line named): metrics at their steps, artifacts, one registry version, the run FINISHED."""
    from hpml import outage

    summary = outage.log_export(path, tracking_uri)
    _print_summary(summary.pop("task"), summary)


@main.command("runs")
@click.option("--stale", is_flag=True, required=True,
              help="list RUNNING runs whose process is gone (kill -9, a crash, a reboot)")
@click.option("--mark", is_flag=True, help="end each stale run KILLED (hpml resume can then continue it)")
@one_line_errors
def runs_cmd(stale, mark):
    """Runs left behind: RUNNING in the store, but their process (host + PID tags) no longer exists."""
    from hpml import tracking

    uri = tracking.connect()
    rows = tracking.stale_runs()
    if not rows:
        click.echo(f"no stale runs at {uri}")
        return
    for r in rows:
        t = r["tags"]
        if mark:
            tracking.mark_killed(r["run_id"])
        click.echo(f"{r['run_id']}  {t.get(tracking.TAG_TASK, '-'):6} {r['name'] or '-':8} pid {t.get(tracking.TAG_PID)} "
                   f"on {t.get(tracking.TAG_HOST)}  {'marked KILLED' if mark else 'stale (RUNNING, process gone)'}")


@main.command("demo")
@click.option("--out", default="demo-data", show_default=True, help="folder for the generated data")
@click.option("--report-dir", default="report", show_default=True, help="folder for the report")
@one_line_errors
def demo(out, report_dir):
    """A few-minute CPU demo of the whole pipeline on generated data (numbers only check the pipeline)."""
    from hpml.demo import run_demo

    run_demo(out, report_dir)


@main.command("vram-probe")
@options(VRAM_PARAMS)
@one_line_errors
def vram_probe(**kw):
    """Peak training-step VRAM of a variant (the study's method) and where it goes. Needs CUDA."""
    from hpml.probe import ProbeConfig, run_probe

    m = run_probe(ProbeConfig(**kw))
    click.echo(", ".join(f"{k}={v:.1f}" for k, v in m.items() if k.endswith("_mib")))


@main.command("bench")
@options(BENCH_PARAMS)
@one_line_errors
def bench(**kw):
    """Speed side by side: the study's Trainer recipe, then each variant's technique (one process, one table)."""
    from hpml.bench import BenchConfig, run_bench

    if kw["purpose"] not in ("demo", "test", "real"):
        raise HpmlError(f"purpose must be one of demo, test, real, got {kw['purpose']!r}")
    run_bench(BenchConfig(**{**kw, "log": parse_bool("log", kw["log"]),
                             "cudagraphs": parse_bool("cudagraphs", kw["cudagraphs"]),
                             "static_widths": parse_bool("static_widths", kw["static_widths"])}), echo=click.echo)


@main.command("score")
@click.option("--data", "data_path", required=True, help="official-format SQuAD v2 JSON (dev-v2.0.json)")
@click.option("--preds", "preds_path", required=True, help="predictions JSON {question id: answer text}")
@click.option("--na-probs", "na_probs_path", default=None, help="no-answer probabilities JSON (null_odds.json)")
@one_line_errors
def score(data_path, preds_path, na_probs_path):
    """Score predictions exactly like the official SQuAD v2 evaluator (same JSON keys)."""
    from hpml.metrics import squad_v2

    click.echo(json.dumps(squad_v2.score_files(data_path, preds_path, na_probs_path), indent=2))


@main.command("make-data")
@click.argument("task", type=click.Choice(task_names()))
@click.option("--out", required=True, help="output folder")
@click.option("--train", "n_train", type=int, default=None, help="training rows/questions")
@click.option("--dev", "n_dev", type=int, default=None, help="dev rows/questions")
@click.option("--seed", type=int, default=0, show_default=True)
@one_line_errors
def make_data(task, out, n_train, n_dev, seed):
    """Generate official-format data: SQuAD v2 JSON, GLUE SST-2 TSV or GLUE MNLI TSV (tests, demos, benchmarks)."""
    from hpml.errors import UsageError
    from hpml.validate import check_writable_dir

    for name, n in (("--train", n_train), ("--dev", n_dev)):
        if n is not None and n <= 0:
            raise UsageError(f"{name} must be > 0 rows/questions, got {n}")
    check_writable_dir(out, "--out")
    spec = get_task(task)
    default_train, default_dev = spec.make_data_sizes
    paths = spec.make_data(out, n_train or default_train, n_dev or default_dev, seed)
    for p in paths:
        click.echo(p)


@main.command("report")
@options(REPORT_PARAMS)
@one_line_errors
def report(**kw):
    """Tables (md/csv/tex) and plots of every hpml run on the tracking server, logged as a `report` run."""
    from hpml.report import run_report

    run_report(**kw)


@main.command("series")
@click.argument("name")
@options(SERIES_PARAMS[1:])
@one_line_errors
def series(name, **kw):
    """Run a study table (squad-a, squad-b, squad-c, sst2, all) or a comma list of variants × seeds as nested
    MLflow runs under one parent, then its report. The same command again resumes: finished runs are kept."""
    from hpml.series import run_series

    run_series(name, **kw)


@main.command("models")
@click.option("--task", type=click.Choice(task_names()), default=None, help="only this task's models")
@one_line_errors
def models_cmd(task):
    """List registered hpml models: every version with its aliases, headline metric, purpose and variant."""
    from hpml import tracking

    uri = tracking.connect()
    headlines = {name: spec.headline for name, spec in all_tasks().items()}
    rows = [r for r in tracking.list_registered(headlines) if task in (None, r["task"])]
    if not rows:
        click.echo(f"no hpml models registered at {uri}")
        return
    table = [("MODEL", "VERSION", "ALIASES", "VARIANT", "PURPOSE", "METRIC", "VALUE", "RUN")] + [
        (r["name"], str(r["version"]), ",".join(r["aliases"]) or "-", r["variant"] or "-", r["purpose"] or "-",
         r["metric"] or "-", "-" if r["value"] is None else f"{r['value']:.4g}", r["run_id"] or "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@main.command("server")
@click.option("--backend-store-uri", default=None,
              help="PostgreSQL URI of the tracking database (created if missing) [default: $HPML_SERVER_DB, "
                   "else postgresql://hpml@127.0.0.1:5432/hpml]")
@click.option("--auth-database-uri", default="",
              help="PostgreSQL URI of the users/permissions database [default: the same server, <db>_auth]")
@click.option("--artifacts-destination", default="mlartifacts", show_default=True,
              help="where the server stores artifacts: a local folder or any MLflow artifact URI (s3://, gs://, ...)")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind (0.0.0.0 for the LAN)")
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--workers", type=int, default=4, show_default=True, help="server worker processes")
@click.option("--default-permission", default="READ", show_default=True,
              help="what every user may do on experiments/models nobody granted them: READ, USE, EDIT, MANAGE, "
                   "NO_PERMISSIONS")
@click.option("--allowed-hosts", default="", help="Host headers to accept beyond localhost/private IPs "
                                                  "(mlflow server --allowed-hosts)")
@one_line_errors
def server_cmd(backend_store_uri, auth_database_uri, artifacts_destination, host, port, workers,
               default_permission, allowed_hosts):
    """A team tracking server: mlflow server on PostgreSQL with proxied artifacts and basic-auth users.
    The first start needs MLFLOW_AUTH_ADMIN_PASSWORD (the admin's password)."""
    from hpml import server

    cfg = server.ServerConfig(
        backend_store_uri=backend_store_uri or os.environ.get("HPML_SERVER_DB") or server.DEFAULT_DB_URI,
        auth_database_uri=auth_database_uri, artifacts_destination=artifacts_destination, host=host, port=port,
        workers=workers, default_permission=default_permission.upper(), allowed_hosts=allowed_hosts)
    sys.exit(server.serve(cfg, echo=click.echo))


@main.command("predict")
@click.option("--model", "model_uri", required=True,
              help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or an hpml export folder")
@click.option("--text", default=None, help="SST-2 models: one sentence to classify")
@click.option("--question", default=None, help="SQuAD models: the question (with --context)")
@click.option("--context", "passage", default=None, help="SQuAD models: the passage to answer from")
@click.option("--file", "in_file", default=None,
              help='JSON lines, one input per line: {"text": …}, {"question": …, "context": …} or '
                   '{"premise": …, "hypothesis": …}; an "id" is copied to the output')
@click.option("--out", default=None, help="write the JSON lines here instead of stdout")
@click.option("--base-model", default=None,
              help="local folder of an adapter's base model, instead of the one recorded at training (offline use)")
@one_line_errors
def predict(model_uri, text, question, passage, in_file, out, base_model):
    """Predict with a registered model: one JSON line per input ({answer, score, null_score} for SQuAD, with
    "" for no answer; {label, probability} for SST-2 and MNLI, whose pairs come in a --file)."""
    from hpml import serving
    from hpml.errors import UsageError

    given = [name for name, v in (("--text", text), ("--question", question), ("--context", passage),
                                  ("--file", in_file)) if v is not None]
    if in_file is not None and len(given) > 1:
        raise UsageError(f"--file takes the inputs from the file: drop {', '.join(g for g in given if g != '--file')}")
    if (question is None) != (passage is None):
        raise UsageError("--question and --context go together (a SQuAD model answers a question from a passage)")
    if not given or (text is not None and question is not None):
        raise UsageError("pass --text (SST-2), --question with --context (SQuAD), or --file with JSON lines")
    if out:
        from hpml.validate import check_writable_file

        check_writable_file(out, "--out")  # before loading the model, not after predicting
    if in_file is not None:
        frame = serving.read_jsonl(in_file)
    else:
        import pandas as pd

        frame = pd.DataFrame([{"text": text} if text is not None else {"question": question, "context": passage}])
    predictor = serving.open_model(model_uri, base_model)
    wanted = tuple(predictor.spec.input_columns)
    if in_file is None and tuple(frame.columns) != wanted:
        flags = {("text",): "--text", ("question", "context"): "--question and --context"}
        how = flags.get(wanted, f"--file with JSON lines holding {', '.join(repr(c) for c in wanted)}")
        raise UsageError(f"{model_uri} is a {predictor.task} model: pass {how}")
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                    for r in serving.output_records(frame, predictor.predict(frame)))
    if out:
        with open(out, "w") as f:
            f.write(lines)
    else:
        click.echo(lines, nl=False)


if __name__ == "__main__":
    main()
