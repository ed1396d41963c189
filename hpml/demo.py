"""`hpml demo`: the whole pipeline in a few minutes on a CPU, on generated data, into the SQLite default store."""
from __future__ import annotations

import os
import time

import click

from hpml.config import TrainConfig

BANNER = ("DEMO: generated data and small models. These numbers only check that the pipeline works "
          "(train -> log -> register -> predict -> report); they say nothing about the techniques.")


def step(title: str) -> float:
    click.secho(f"\n== {title}", bold=True)
    return time.time()


def run_demo(out_dir: str = "demo-data", report_dir: str = "report") -> None:
    from hpml import modeling, serving, tracking
    from hpml.data import synthetic
    from hpml.training import run_training

    t0 = time.time()
    click.secho(BANNER, fg="yellow")
    uri = tracking.connect()
    click.echo(f"tracking store: {uri}")

    step("1/5 generate data (GLUE-format SST-2 TSV, SQuAD-v2-format JSON)")
    sst2_dir, squad_dir = os.path.join(out_dir, "sst2"), os.path.join(out_dir, "squad")
    synthetic.write_sst2(sst2_dir, 640, 200, seed=0)  # small: MiniLM takes ~1 s a step here
    synthetic.write_squad(squad_dir, 600, 150, seed=0)

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
        summary = run_training(cfg)
        click.echo(f"run {summary['run_id']}: registered {summary.get('registered')} v{summary.get('version')}")

    step("5/5 predict with the registered champions, then build the report")
    sst2 = serving.load_registered("models:/hpml-sst2-fp32@champion")
    squad = serving.load_registered("models:/hpml-squad-a2@champion")
    import pandas as pd

    click.echo(sst2.predict(pd.DataFrame({"text": ["a warm , funny and moving film", "a dull , lifeless mess"]})))
    example = synthetic.make_squad(1, seed=123)["data"][0]["paragraphs"][0]
    qa = squad.predict(pd.DataFrame({"question": [example["qas"][0]["question"]], "context": [example["context"]]}))
    click.echo(qa)

    from hpml.report import run_report

    run_report(tracking_uri="", out=report_dir, formats="md,csv", experiments="", purpose="demo")
    click.secho(f"\nDemo finished in {time.time() - t0:.0f} s. " + BANNER.split(". ", 1)[1], fg="yellow")
    click.echo(f"Tables and plots: {report_dir}/. Browse the runs and registered models with:\n"
               "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   # then open http://127.0.0.1:5000")
