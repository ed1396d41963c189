"""The one training path: data → model → HF Trainer → evaluation → MLflow run → export → registry."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from hpml import checkpoints, launch, modeling, serving, signals, tracking, validate
from hpml.config import TrainConfig, short_model
from hpml.data.batching import Collator
from hpml.errors import UsageError
from hpml.metrics import memory
from hpml.variants import Variant, get_variant


# ---- tasks: what differs between SST-2 and SQuAD, behind one small interface ---------------------------
@dataclass
class Prepared:
    train: object  # tokenized training features (datasets.Dataset)
    eval_examples: object  # raw eval examples
    eval_features: object  # tokenized eval features (SQuAD: with example_id / offset_mapping)
    fingerprint: str


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_source(cfg: TrainConfig, files: list[str], hub: str) -> dict:
    if cfg.data_dir:
        return {"files": {os.path.basename(p): file_digest(p) for p in files}}
    return {"hub": hub}


# Where each task's data comes from: (hub dataset, hub config, {split: local file name}). The fingerprint's
# hub string stays "path/config" as before, so existing runs keep comparing equal.
def _data_spec(task: str) -> tuple[str, Optional[str], dict[str, str]]:
    from hpml.data import squad, sst2

    return {"sst2": ("nyu-mll/glue", "sst2", sst2.FILES), "squad": (squad.HUB_DATASET, None, squad.SPLIT_FILES)}[task]


def data_fingerprint(cfg: TrainConfig) -> str:
    """The `data_fingerprint` tag: file contents (or hub dataset) and the sample limits. Cheap (no
    tokenization), so `hpml series` computes it too when deciding whether a finished run can be kept."""
    hub, config, files = _data_spec(cfg.task)
    paths = [os.path.join(cfg.data_dir, f) for f in files.values()] if cfg.data_dir else []
    return fingerprint({**data_source(cfg, paths, "/".join(x for x in (hub, config) if x)),
                        "max_train_samples": cfg.max_train_samples, "max_eval_samples": cfg.max_eval_samples})


def hub_revision(ds) -> Optional[str]:
    """The commit of a hub dataset as loaded: the datasets cache keeps it as a 40-hex folder name."""
    import re

    for entry in getattr(ds, "cache_files", None) or []:
        found = re.search(r"/([0-9a-f]{40})/", entry.get("filename", ""))
        if found:
            return found.group(1)
    return None


def dataset_inputs(cfg: TrainConfig, revision: Optional[str] = None) -> list[dict]:
    """What the run trained and evaluated on, for mlflow.log_input: name, digest, source, context.

    The digest covers the split's file contents (or hub ID + revision) and its sample limit, so two runs
    show different datasets in the UI exactly when they read different data."""
    hub, config, files = _data_spec(cfg.task)
    out = []
    for context, split, limit in (("train", "train", cfg.max_train_samples),
                                  ("eval", "validation", cfg.max_eval_samples)):
        name = f"{cfg.task}-{split}" + (f"[:{limit}]" if limit else "")
        if cfg.data_dir:
            path = os.path.abspath(os.path.join(cfg.data_dir, files[split]))
            digest = fingerprint({"sha256": file_digest(path), "limit": limit})
            out.append({"name": name, "digest": digest, "context": context, "path": path})
        else:
            digest = fingerprint({"hub": hub, "config": config, "split": split, "revision": revision, "limit": limit})
            out.append({"name": name, "digest": digest, "context": context,
                        "hub": {"path": hub, "config_name": config, "split": split, "revision": revision}})
    return out


def config_hash(params: dict[str, object]) -> str:
    """The `config_hash` tag: the resolved configuration minus where it is logged (experiment), whether the
    model is registered and where/how often it is checkpointed, none of which changes what is trained."""
    return fingerprint({k: str(v) for k, v in params.items()
                        if k not in ("resolved.experiment", "resolved.register") and k not in checkpoints.NOT_CONFIG})


def recipe_hash(params: dict[str, object], data_fingerprint: str) -> str:
    """The `recipe_hash` tag: configuration and data without the seed. Runs sharing it are repeats of one
    recipe, and the report's mean and confidence interval are taken over them."""
    return config_hash({**{k: v for k, v in params.items() if k != "resolved.seed"}, "data": data_fingerprint})


def run_identity(cfg: TrainConfig) -> dict[str, str]:
    """The tags that say whether two runs trained the same thing on the same data: config hash and data
    fingerprint (with the git commit, what `hpml series` compares before skipping a finished child).
    Raises UsageError (one line) for an unknown variant or a CUDA-only one on a CPU."""
    from dataclasses import replace

    variant = get_variant(cfg.variant, cfg.task)
    precision = modeling.resolve_precision(variant, modeling.check_device(variant))
    params = resolve_params(replace(cfg, variant=variant.id), variant, precision)
    return {tracking.TAG_CONFIG_HASH: config_hash(params), tracking.TAG_FINGERPRINT: data_fingerprint(cfg)}


def describe(cfg: TrainConfig, variant: Variant) -> str:
    """The run's description (mlflow.note.content): the UI's run list then says what each run was."""
    data = cfg.data_dir or "hub"
    limits = "".join(f", {k} {v}" for k, v in (("max_steps", cfg.max_steps), ("max_train_samples",
                                                                               cfg.max_train_samples)) if v)
    return (f"{variant.id} on {short_model(cfg.model)}: {variant.description}. "
            f"seed {cfg.seed}, purpose {cfg.purpose}, data {data}{limits}.")


class Sst2Task:
    name = "sst2"

    def prepare(self, cfg: TrainConfig, tokenizer, cache_dir: str) -> Prepared:
        from hpml.data import sst2

        train = sst2.load_sst2(cfg.data_dir, "train", cfg.max_train_samples)
        dev = sst2.load_sst2(cfg.data_dir, "validation", cfg.max_eval_samples)
        fp = data_fingerprint(cfg)
        return Prepared(sst2.tokenize(train, tokenizer, cfg.max_length), dev,
                        sst2.tokenize(dev, tokenizer, cfg.max_length), fp)

    def evaluate(self, trainer, prep: Prepared, cfg: TrainConfig, out_dir: str) -> dict[str, float]:
        out = trainer.predict(prep.eval_features)
        probs = torch.softmax(torch.tensor(out.predictions, dtype=torch.float32), dim=-1).numpy()
        labels = np.asarray(prep.eval_features["labels"])
        rows = [{"label": int(p.argmax()), "probability": float(p.max())} for p in probs]
        with open(os.path.join(out_dir, "predictions.json"), "w") as f:
            json.dump(rows, f)
        return {tracking.M_ACCURACY: float((probs.argmax(-1) == labels).mean()),
                **eval_timing(out.metrics, len(labels))}

    def epoch_metrics(self, eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


class SquadTask:
    name = "squad"

    def prepare(self, cfg: TrainConfig, tokenizer, cache_dir: str) -> Prepared:
        from hpml.data import squad

        train = squad.load_squad(cfg.data_dir, "train")
        dev = squad.load_squad(cfg.data_dir, "validation")
        if cfg.max_train_samples and cfg.max_train_samples < len(train):
            train = train.select(range(cfg.max_train_samples))
        if cfg.max_eval_samples and cfg.max_eval_samples < len(dev):
            dev = dev.select(range(cfg.max_eval_samples))
        fp = data_fingerprint(cfg)
        tok_name = getattr(tokenizer, "name_or_path", "tok")
        feats = {}
        for kind, ds, fn in (("train", train, squad.prepare_train_features),
                             ("eval", dev, squad.prepare_eval_features)):
            key = squad.feature_cache_key(fp, tok_name, cfg.max_length, cfg.doc_stride, kind)
            feats[kind] = squad.tokenize_cached(
                ds, lambda b, fn=fn: fn(b, tokenizer, cfg.max_length, cfg.doc_stride), cache_dir, key,
                remove_columns=ds.column_names)
        train_feats = feats["train"].map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True)
        return Prepared(train_feats, dev, feats["eval"], fp)

    def evaluate(self, trainer, prep: Prepared, cfg: TrainConfig, out_dir: str) -> dict[str, float]:
        from hpml.data import squad
        from hpml.metrics import squad_v2

        if getattr(trainer, "hpml_sampler", None) is not None:  # packed variants evaluate packed too
            from hpml import packing

            start_logits, end_logits, timing = packing.evaluate_qa(trainer, prep.eval_features, cfg)
        else:
            model_inputs = prep.eval_features.remove_columns(["example_id", "offset_mapping"])
            out = trainer.predict(model_inputs)
            start_logits, end_logits = out.predictions[:2] if isinstance(out.predictions, tuple) else out.predictions
            timing = eval_timing(out.metrics, len(prep.eval_features))
        result = squad.postprocess_predictions(prep.eval_examples, prep.eval_features, start_logits, end_logits,
                                               n_best=cfg.n_best, max_answer_length=cfg.max_answer_length,
                                               null_threshold=cfg.null_threshold)
        for name, obj in (("predictions.json", result.predictions), ("null_odds.json", result.null_odds)):
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(obj, f)
        scores = squad_v2.evaluate(list(prep.eval_examples), result.predictions, na_probs=result.null_odds)
        return {**{f"eval_{k}": v for k, v in scores.items()},
                **timing}

    epoch_metrics = None  # SQuAD is scored once, after training (postprocessing needs all windows)


TASKS = {"sst2": Sst2Task(), "squad": SquadTask()}


def eval_timing(metrics: dict, n: int) -> dict[str, float]:
    runtime = metrics.get("test_runtime", 0.0)
    return {tracking.M_EVAL_RUNTIME: runtime, tracking.M_EVAL_SPS: n / runtime if runtime else 0.0,
            tracking.M_EVAL_MS: 1000.0 * runtime / n if n else 0.0}


# ---- Trainer -------------------------------------------------------------------------------------------
def training_arguments(variant: Variant, cfg: TrainConfig, precision: str, out_dir: str, device: str,
                       per_epoch_eval: bool):
    from transformers import TrainingArguments

    opt = variant.optimizer
    world = launch.context().world  # batch sizes are global: each of `world` processes takes its share
    return TrainingArguments(
        output_dir=out_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        per_device_train_batch_size=cfg.batch_size // world,
        per_device_eval_batch_size=max(1, cfg.eval_batch_size // world),
        learning_rate=cfg.lr if cfg.lr is not None else opt.lr,
        weight_decay=opt.weight_decay,
        warmup_steps=opt.warmup_ratio,  # a float < 1 is a ratio of total steps (transformers 5)
        lr_scheduler_type=opt.scheduler,
        # fused AdamW: one kernel per step instead of a loop over parameter tensors (CUDA only here)
        optim="adamw_bnb_8bit" if opt.name == "adamw_8bit" else
              "adamw_torch_fused" if device == "cuda" else "adamw_torch",
        bf16=precision == "bf16",
        fp16=precision == "fp16" and not variant.precision.quantization,  # 4-bit: compute dtype set at load
        torch_compile=variant.compile.enabled,
        torch_compile_backend=variant.compile.backend if variant.compile.enabled else None,
        **({"torch_compile_mode": variant.compile.mode} if variant.compile.mode != "default" else {}),
        train_sampling_strategy="group_by_length" if variant.batching.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,  # the collator drops bookkeeping columns itself
        eval_strategy="epoch" if per_epoch_eval else "no",
        # resumable checkpoints under output_dir/<run ID> (single-process runs: see _train_in_run)
        **(checkpoints.save_arguments(cfg) if not launch.context().distributed else {"save_strategy": "no"}),
        logging_strategy="steps",
        logging_steps=max(1, min(50, cfg.max_steps or 50)),
        report_to="none",  # hpml's own callback logs to MLflow through tracking.py
        seed=cfg.seed,
        use_cpu=device == "cpu",
        # collation in two worker processes on a GPU (pinned memory, Trainer's default): off the step's path
        dataloader_num_workers=2 if device == "cuda" else 0,
        dataloader_persistent_workers=device == "cuda",
        ddp_backend=("gloo" if device == "cpu" else "nccl") if world > 1 else None,
        # Frozen weights (BitFit, freezing, LoRA) have requires_grad=False and are not DDP's concern; the
        # default (True) would walk the autograd graph every step looking for unused ones.
        ddp_find_unused_parameters=False,
        # passed only when used: transformers 5.23 renamed it (activation_checkpointing), 5.17 lacks the new name
        **({"gradient_checkpointing": True} if variant.memory.gradient_checkpointing else {}),
    )


def make_callback(samples_per_step: int, device: str):
    from transformers import TrainerCallback

    class MlflowProgress(TrainerCallback):
        """Streams running loss, lr and per-epoch eval metrics to the active run (UI curves while training),
        and times the steps after a warm-up: Trainer's own samples/s includes torch.compile's first graphs."""

        warm_step, warm_time, steady = 0, 0.0, None

        def on_train_begin(self, args, state, control, **kw):
            # counted from the first step of this session: a resumed run starts past step 0
            self.warm_step = state.global_step + max(1, min(20, (state.max_steps - state.global_step) // 5))

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (self.warm_step, state.max_steps):
                if device == "cuda":
                    torch.cuda.synchronize()  # one host sync at each of the two timing points only
                now = time.perf_counter()
                if state.global_step == self.warm_step:
                    self.warm_time = now
                elif state.max_steps > self.warm_step:
                    steps = state.max_steps - self.warm_step
                    self.steady = steps * samples_per_step / (now - self.warm_time)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero:
                return  # Trainer's logged loss is already averaged over ranks; rank 0 alone talks to MLflow
            keep = {f"train_{k}_running" if k == "loss" else k: v for k, v in (logs or {}).items()
                    if k in ("loss", "learning_rate", "grad_norm")}
            if keep:
                tracking.log_metrics(keep, step=state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not state.is_world_process_zero:
                return
            acc = (metrics or {}).get("eval_accuracy")
            if acc is not None:
                tracking.log_metrics({tracking.M_ACCURACY: acc}, step=int(round(state.epoch or 0)))

    return MlflowProgress()


def trainer_class():
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class HpmlTrainer(checkpoints.LossTracking, Trainer):
        """Length grouping is for training batches only. transformers 5 also applies it to evaluation, and then
        returns predictions in the grouped (shuffled) order, so they no longer line up with the features they
        are mapped back to: the study's A4-b collapse (EM 25.8). Evaluation here always keeps dataset order."""

        def _get_eval_sampler(self, eval_dataset):
            return SequentialSampler(eval_dataset) if eval_dataset is not None else None

    return HpmlTrainer


def build_trainer(task, variant: Variant, cfg: TrainConfig, built: modeling.Built, prep: Prepared, precision: str,
                  out_dir: str, device: str):

    per_epoch = task.epoch_metrics is not None
    args = training_arguments(variant, cfg, precision, out_dir, device, per_epoch)
    if variant.batching.padding == "packed":
        from hpml import packing

        trainer = packing.build_packed_trainer(trainer_class(), built, prep.train, cfg, args, device,
                                               make_callback)
        trainer.add_callback(signals.stop_callback())  # a first signal stops at a step with a checkpoint
        return trainer
    collate = Collator(built.tokenizer.pad_token_id, cfg.max_length, variant.batching)
    return trainer_class()(model=built.model, args=args, train_dataset=prep.train,
                   eval_dataset=prep.eval_features if per_epoch else None, data_collator=collate,
                   compute_metrics=task.epoch_metrics if per_epoch else None,
                   callbacks=[make_callback(cfg.batch_size, device), signals.stop_callback()])


# ---- the run ---------------------------------------------------------------------------------------------
def resolve_params(cfg: TrainConfig, variant: Variant, precision: str) -> dict[str, object]:
    """The configuration the run really used: defaults filled in, variant settings flattened."""
    params = {k: v for k, v in asdict(cfg).items() if k not in ("extra", "resume")}
    if cfg.task == "sst2":
        for k in ("doc_stride", "n_best", "max_answer_length", "null_threshold", "max_tokens"):
            params.pop(k)
    params["lr"] = cfg.lr if cfg.lr is not None else variant.optimizer.lr
    params["precision"] = precision
    return {**{f"resolved.{k}": v for k, v in params.items()}, **variant.to_params()}


def cache_dir() -> str:
    return os.environ.get("HPML_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hpml")


def run_training(cfg: TrainConfig, inputs: Optional[dict[str, object]] = None) -> dict[str, object]:
    """Train, evaluate, log and register one variant. Returns a summary (metrics, run id, registry version)."""
    if cfg.resume:  # the run's own configuration replaces the options given
        tracking.connect()
        cfg = checkpoints.to_resume(cfg.resume, cfg.task)
    task = TASKS[cfg.task]
    variant = get_variant(cfg.variant, cfg.task)
    cfg.output_dir = checkpoints.root_dir(cfg)
    cfg.variant = variant.id
    if cfg.purpose not in tracking.PURPOSES:
        raise UsageError(f"purpose must be one of {', '.join(tracking.PURPOSES)}, got {cfg.purpose!r}")
    validate.check_train(cfg, variant)  # every number, path and file encoding: one line, before any run
    device = modeling.check_device(variant)
    precision = modeling.resolve_precision(variant, device)
    # On a team server: credentials and EDIT on the experiment and registered model, before any work.
    tracking.connect(experiment=cfg.experiment or tracking.DEFAULT_EXPERIMENT[cfg.task],
                     model=tracking.registered_model_name(cfg.task, variant.id) if cfg.register else "")
    work = tempfile.mkdtemp(prefix=f"hpml-{cfg.task}-{variant.id}-")
    try:
        # Inputs are validated before the run exists, so a bad file or model leaves no run behind.
        model_ref = modeling.resolve_model_ref(cfg.model)
        tokenizer = modeling.load_tokenizer(model_ref)
        dist = launch.context()
        with launch.main_first():  # rank 0 tokenizes and caches; the other ranks then load its cache
            prep = task.prepare(cfg, tokenizer, cache_dir())
        tags = {tracking.TAG_VARIANT: variant.id, tracking.TAG_PURPOSE: cfg.purpose,
                tracking.TAG_FINGERPRINT: prep.fingerprint, tracking.TAG_PRECISION: precision}
        params = resolve_params(cfg, variant, precision)
        tags[tracking.TAG_CONFIG_HASH] = config_hash(params)
        tags[tracking.TAG_RECIPE] = recipe_hash(params, prep.fingerprint)
        tags[tracking.TAG_DESCRIPTION] = describe(cfg, variant)
        if not dist.is_main:  # data-parallel ranks > 0 train and evaluate alongside rank 0, never track
            return _train_in_run(task, variant, cfg, prep, precision, device, work, "", tags)
        with tracking.run(cfg.task, variant.id, cfg.experiment, tags, inputs or {}, params,
                          system_metrics=tracking.system_metrics_wanted(device), resume_run_id=cfg.resume) as run_id:
            launch.record_run_id(run_id)
            tracking.log_datasets(dataset_inputs(cfg, hub_revision(prep.eval_examples)))
            return _train_in_run(task, variant, cfg, prep, precision, device, work, run_id, tags)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_in_run(task, variant, cfg, prep, precision, device, work, run_id, tags) -> dict[str, object]:
    main = launch.context().is_main
    memory.reset_peak(device)
    built = modeling.build_model(variant, cfg.model, cfg.task, work, cfg.seed)
    if main:
        tracking.log_metrics(built.counts.as_metrics())
    # Resumable checkpoints need a folder every rank knows before the run exists: single-process runs only.
    resumable = not launch.context().distributed
    ckpt_dir = checkpoints.run_dir(cfg, run_id) if resumable else os.path.join(work, "trainer")
    if resumable:
        tracking.set_tags({tracking.TAG_CHECKPOINT_DIR: ckpt_dir})
    trainer = build_trainer(task, variant, cfg, built, prep, precision, ckpt_dir, device)
    resume_from = checkpoints.last_checkpoint(ckpt_dir) if (cfg.resume and resumable) else None
    if resume_from:
        tracking.set_tags({tracking.TAG_RESUMED_AT: os.path.basename(resume_from).split("-")[-1]})
    trainer.start_from(resume_from)
    with signals.deferred():  # a first SIGINT/SIGTERM stops at the next step with a checkpoint, then raises
        result = trainer.train(resume_from_checkpoint=resume_from)
    last_epoch = max(1, int(round(trainer.state.epoch or 0)))  # final metrics sit at the last epoch's step
    progress = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "steady"))
    # Summed over every step, those before a resume included (Trainer's own mean covers this session only).
    metrics = {tracking.M_TRAIN_LOSS: trainer.loss_sum() / max(1, trainer.state.global_step),
               tracking.M_TRAIN_STEADY_SPS: progress.steady,
               tracking.M_TRAIN_RUNTIME: result.metrics["train_runtime"],
               tracking.M_TRAIN_SPS: result.metrics["train_samples_per_second"],
               **launch.max_over_ranks(memory.peak_train(device))}  # per-GPU peak: the max over ranks
    artifacts = os.path.join(work, "artifacts")
    os.makedirs(artifacts)
    metrics.update(task.evaluate(trainer, prep, cfg, artifacts))  # every rank: predict gathers across ranks
    if not main:
        return {"run_id": "", "variant": variant.id, "metrics": metrics}
    export_dir = serving.write_export(
        os.path.join(work, "export"), built.model, built.tokenizer, task=cfg.task, variant=variant,
        base_ref=built.base_path, base_is_local_copy=built.base_is_materialized,
        settings={"max_length": cfg.max_length, "doc_stride": cfg.doc_stride, "n_best": cfg.n_best,
                  "max_answer_length": cfg.max_answer_length, "null_threshold": cfg.null_threshold})
    if device == "cuda":
        # As the study: eval memory with the saved checkpoint reloaded alone on the GPU.
        del trainer
        built.model = None
        metrics.update(memory.reload_eval_vram(export_dir, prep, cfg))
    tracking.log_metrics(metrics, step=last_epoch)
    tracking.log_artifacts(artifacts)
    summary: dict[str, object] = {"run_id": run_id, "variant": variant.id, "metrics": metrics}
    if cfg.register:
        name, version, champion = tracking.register_model(export_dir, cfg.task, variant.id, metrics, tags)
        summary.update(registered=name, version=version, champion=champion)
    if resumable:
        checkpoints.remove(ckpt_dir)  # finished: the registry (or the run's artifacts) holds what is needed
    return summary
