"""`hpml demo`: the whole pipeline in a few minutes on a CPU, on generated data, into the SQLite default store."""
from __future__ import annotations

import contextlib
import os
import sys
import time

import click

from hpml.config import SQUAD_PARAMS, SST2_PARAMS, TrainConfig

LOG_FILE = "demo.log"
NO_ANSWER = "(no answer)"

BANNER = ("DEMO: generated data and small models. These numbers only check that the pipeline works "
          "(train -> log -> register -> predict -> report); they say nothing about the techniques.")


def step(title: str) -> float:
    click.secho(f"\n== {title}", bold=True)
    return time.time()


@contextlib.contextmanager
def to_log(path: str):
    """Everything the libraries print (progress bars, load reports, warnings, MLflow INFO) goes to the log:
    file descriptors 1 and 2 are redirected, so output from C code and from loggers bound to the terminal
    at import time goes there too. The demo's own lines are printed outside these blocks."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def cli_inputs(cfg: TrainConfig) -> dict[str, object]:
    """The params a CLI run of `cfg` logs under their plain names, so demo runs carry the same keys."""
    params = SQUAD_PARAMS if cfg.task == "squad" else SST2_PARAMS
    out = {}
    for p in params:
        value = getattr(cfg, p.name)
        out[p.name] = "" if value is None else ("true" if value is True else "false" if value is False else value)
    return out


def answer_text(answer: str) -> str:
    return answer if answer.strip() else NO_ANSWER


def run_demo(out_dir: str = "demo-data", report_dir: str = "report", log_path: str = LOG_FILE) -> None:
    from hpml import modeling, serving, tracking
    from hpml.data import synthetic
    from hpml.training import run_training

    t0 = time.time()
    click.secho(BANNER, fg="yellow")
    open(log_path, "w").close()
    with to_log(log_path):
        uri = tracking.connect()
    click.echo(f"tracking store: {uri}; library output goes to {log_path}")

    step("1/5 generate data (GLUE-format SST-2 TSV, SQuAD-v2-format JSON)")
    sst2_dir, squad_dir = os.path.join(out_dir, "sst2"), os.path.join(out_dir, "squad")
    with to_log(log_path):
        synthetic.write_sst2(sst2_dir, 640, 200, seed=0)  # small: MiniLM takes ~1 s a step here
        synthetic.write_squad(squad_dir, 600, 150, seed=0)
    click.echo(f"{sst2_dir}/ (640 train, 200 dev sentences), {squad_dir}/ (600 train, 150 dev questions)")

    # MiniLM (a real pretrained BERT-family encoder, 22.7M params) when installed, else a tiny random BERT.
    small = "minilm" if modeling.minilm_path() else "random:tiny"
    runs = [
        TrainConfig(task="sst2", variant="fp32", model=small, data_dir=sst2_dir, epochs=1, batch_size=32,
                    eval_batch_size=64, max_length=64, lr=1e-4, purpose="demo", experiment="hpml-sst2"),
        TrainConfig(task="sst2", variant="lora", model=small, data_dir=sst2_dir, epochs=1, batch_size=32,
                    eval_batch_size=64, max_length=64, lr=1e-3, purpose="demo", experiment="hpml-sst2"),
        TrainConfig(task="squad", variant="a2", model="random:tiny", data_dir=squad_dir, epochs=2, batch_size=32,
                    eval_batch_size=64, max_length=256, doc_stride=64, lr=1e-3, purpose="demo",
                    experiment="hpml-squad"),
    ]
    for i, cfg in enumerate(runs, start=2):
        step(f"{i}/5 train {cfg.task} variant {cfg.variant} ({cfg.model}, {cfg.purpose} run)")
        with to_log(log_path):
            summary = run_training(cfg, inputs=cli_inputs(cfg))
        m = summary["metrics"]
        shown = (f"accuracy {m['eval_accuracy']:.3f}" if cfg.task == "sst2"
                 else f"EM {m['eval_exact']:.1f}, F1 {m['eval_f1']:.1f}")
        champ = " (champion)" if summary.get("champion") else ""
        click.echo(f"{shown} in {m['train_runtime_s']:.0f} s; run {summary['run_id']}; registered "
                   f"{summary.get('registered')} version {summary.get('version')}{champ}")

    step("5/5 predict with the registered champions, then build the report")
    import pandas as pd

    sentences = ["a warm , funny and moving film", "a dull , lifeless mess"]
    example = synthetic.make_squad(1, seed=123)["data"][0]["paragraphs"][0]
    question = example["qas"][0]["question"]
    with to_log(log_path):
        sst2 = serving.load_registered("models:/hpml-sst2-fp32@champion")
        squad = serving.load_registered("models:/hpml-squad-a2@champion")
        labels = sst2.predict(pd.DataFrame({"text": sentences}))
        qa = squad.predict(pd.DataFrame({"question": [question], "context": [example["context"]]}))
    for text, row in zip(sentences, labels.to_dict("records")):
        click.echo(f"hpml-sst2-fp32@champion: {text!r} -> label {row['label']} (p={row['probability']:.2f})")
    click.echo(f"hpml-squad-a2@champion: {question!r} -> {answer_text(qa['answer'].iloc[0])!r}")

    from hpml.report import run_report

    with to_log(log_path):
        files = run_report(tracking_uri="", out=report_dir, formats="md,csv", experiments="", purpose="demo")
    click.echo(f"report: {len(files)} files in {report_dir}/ (report.md, tables as CSV, plots)")
    click.secho(f"\nDemo finished in {time.time() - t0:.0f} s. " + BANNER.split(". ", 1)[1], fg="yellow")
    click.echo(f"Library output and the full report text: {log_path}. Next steps:\n"
               f"  . .venv/bin/activate                 # puts hpml and mlflow on PATH for the commands below\n"
               f"  mlflow ui --backend-store-uri sqlite:///mlflow.db   # then open http://127.0.0.1:5000\n"
               f"  hpml predict --model models:/hpml-sst2-fp32@champion --text \"a warm, funny film\"\n"
               f"  hpml series sst2 --seeds 3 --model {small} --data-dir {sst2_dir} --epochs 1 --purpose demo")
