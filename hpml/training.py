"""The one training path: data → model → HF Trainer → evaluation → MLflow run → export → registry."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Optional

import torch

from hpml import checkpoints, export, launch, lean, modeling, outage, signals, tracking, validate
from hpml.config import TrainConfig, cache_dir, short_model
from hpml.data.batching import Collator
from hpml.errors import UsageError
from hpml.metrics import memory
from hpml.tasks import Prepared, TaskSpec, fingerprint, get_task
from hpml.variants import Variant, get_variant


# ---- what the run trained on, and how runs compare ---------------------------------------------------------
def data_fingerprint(cfg: TrainConfig) -> str:
    """The `data_fingerprint` tag, exactly as the task's prepare() computes it (files or hub dataset +
    revision, and the sample limits). Cheap (no tokenization), so `hpml series` computes it too."""
    return get_task(cfg.task).fingerprint(cfg)


def dataset_inputs(cfg: TrainConfig) -> list[dict]:
    """What the run trained and evaluated on, for mlflow.log_input: name, digest, source, context.

    The digest covers the split's file contents (or hub ID + revision) and its sample limit, so two runs
    show different datasets in the UI exactly when they read different data."""
    from hpml.tasks import file_digest, load_revision

    spec = get_task(cfg.task)
    revision = load_revision(cfg.data_dir, spec.hub_repo)
    out = []
    for context, split, limit in (("train", "train", cfg.max_train_samples),
                                  ("eval", "validation", cfg.max_eval_samples)):
        name = f"{cfg.task}-{split}" + (f"[:{limit}]" if limit else "")
        if cfg.data_dir:
            path = os.path.abspath(os.path.join(cfg.data_dir, spec.files[split]))
            digest = fingerprint({"sha256": file_digest(path), "limit": limit})
            out.append({"name": name, "digest": digest, "context": context, "path": path})
        else:
            digest = fingerprint({"hub": spec.hub_repo, "config": spec.hub_config, "split": split,
                                  "revision": revision, "limit": limit})
            out.append({"name": name, "digest": digest, "context": context,
                        "hub": {"path": spec.hub_repo, "config_name": spec.hub_config, "split": split,
                                "revision": revision}})
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


# ---- evaluation ----------------------------------------------------------------------------------------
def timed_predict(trainer, features, batch_size: int):
    """trainer.predict after one untimed warm-up batch: the first batch pays for compiled graphs, cuDNN/cuBLAS
    autotuning and allocator growth, which is not the steady latency the eval metrics report."""
    trainer.predict(features.select(range(min(batch_size, len(features)))))
    return trainer.predict(features)


def eval_timing(metrics: dict, n: int) -> dict[str, float]:
    runtime = metrics.get("test_runtime", 0.0)
    return {tracking.M_EVAL_RUNTIME: runtime, tracking.M_EVAL_SPS: n / runtime if runtime else 0.0,
            tracking.M_EVAL_MS: 1000.0 * runtime / n if n else 0.0}


def evaluate(trainer, spec: TaskSpec, prep: Prepared, cfg: TrainConfig, out_dir: str) -> dict[str, float]:
    """Predict the eval set (timed after a warm-up batch), score it with the task's pure evaluate(), and
    write its artifacts (predictions.json …) to out_dir."""
    if getattr(trainer, "hpml_sampler", None) is not None:  # packed variants evaluate packed too
        from hpml import packing

        start_logits, end_logits, timing = packing.evaluate_qa(trainer, prep.eval_features, cfg)
        predictions = (start_logits, end_logits)
    else:
        features = spec.eval_inputs(prep)
        out = timed_predict(trainer, features, cfg.eval_batch_size)
        predictions = out.predictions if isinstance(out.predictions, tuple) else (out.predictions,)
        timing = eval_timing(out.metrics, len(features))
    result = spec.evaluate(predictions, prep, cfg)
    for name, obj in result.artifacts.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f)
    return {**result.metrics, **timing}


# ---- Trainer -------------------------------------------------------------------------------------------
def training_arguments(cfg: TrainConfig, variant: Variant, built: modeling.Built, out_dir: str, device: str,
                       per_epoch_eval: bool, **overrides):
    """The one place TrainingArguments are built: run-level settings from cfg, techniques from the pipeline
    (built.arguments), then `overrides` (the VRAM probe's two steps, a resumed run's settings)."""
    from transformers import TrainingArguments

    world = launch.context().world  # batch sizes are global: each of `world` processes takes its share
    run_level = dict(
        output_dir=out_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        per_device_train_batch_size=cfg.batch_size // world,
        per_device_eval_batch_size=max(1, cfg.eval_batch_size // world),
        learning_rate=cfg.lr if cfg.lr is not None else variant.optimizer.lr,
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
        # No host sync inside a step. The Trainer's NaN/Inf loss filter reads each step's loss on the host
        # (a sync per step; a NaN loss now shows as NaN in the logged loss instead of being smoothed over),
        # and a blocking copy of the batch to the GPU waits for the previous step's kernels.
        logging_nan_inf_filter=False,
        **({"accelerator_config": {"non_blocking": True}} if device == "cuda" else {}),
        ddp_backend=("gloo" if device == "cpu" else "nccl") if world > 1 else None,
        # Frozen weights (BitFit, freezing, LoRA) have requires_grad=False and are not DDP's concern; the
        # default (True) would walk the autograd graph every step looking for unused ones.
        ddp_find_unused_parameters=False,
    )
    return TrainingArguments(**{**run_level, **built.arguments, **overrides})


def _now() -> float:
    """The steady rate's clock (one name, so tests can drive it without touching time.perf_counter)."""
    return time.perf_counter()


def make_callback(samples_per_step: int, device: str):
    from transformers import TrainerCallback

    class MlflowProgress(TrainerCallback):
        """Streams running loss, lr and per-epoch eval metrics to the active run (UI curves while training),
        and times the steps after a warm-up: Trainer's own samples/s includes torch.compile's first graphs.
        What falls between the two timing points and is not a training step (a checkpoint save, an
        evaluation, a compile of a new shape) is timed apart and left out of the steady rate."""

        warm_step, warm_time, steady, first_step_at, start_step = 0, 0.0, None, None, 0
        paused_s, steady_paused_s = 0.0, 0.0  # checkpoint saves and evaluations: all, and inside the timed steps
        compile_s, recompiles, step, pausing, _compile_at, _hooks = 0.0, 0, 0, False, None, None
        per_step = samples_per_step  # features per optimizer step (packed runs: the packs' average)

        def _compile_start(self, args) -> None:
            self._compile_at = _now()

        def _compile_end(self, args) -> None:
            if self._compile_at is None:
                return
            spent, self._compile_at = _now() - self._compile_at, None
            self.compile_s += spent
            if self.step > self.warm_step and not self.pausing:  # in a step after the warm-up ones (an
                # evaluation's compile between steps is inside that pause already)
                if args.callback_trigger.name == "DYNAMO":  # a new graph; a lazily compiled backward or a
                    self.recompiles += 1  # CUDA-graph recording belongs to a graph counted already
                self.pause(spent, self.step, compiling=True)

        def on_train_end(self, args, state, control, **kw):
            self.watch_compiles(False)

        def watch_compiles(self, on: bool) -> None:
            """torch.compile's own compile-event hooks (dynamo's callback handler: frames, lazily compiled
            backward graphs, CUDA-graph recording): a compile in the middle of training, a pad-to-longest
            run meeting a new width, is counted and timed apart from the steady rate."""
            try:
                from torch._dynamo.callback import callback_handler
            except ImportError:  # a torch without the hooks: compile time stays inside the steady rate
                return
            if on and self._hooks is None:
                self._hooks = (callback_handler.register_start_callback(self._compile_start),
                               callback_handler.register_end_callback(self._compile_end))
            elif not on and self._hooks is not None:
                callback_handler.remove_start_callback(self._hooks[0])
                callback_handler.remove_end_callback(self._hooks[1])
                self._hooks = None

        def pause(self, seconds: float, step: int, compiling: bool = False) -> None:
            """Time spent at `step` outside the step's own work (a save, an evaluation, a compile): the steady
            rate leaves out what fell between its two timing points (a save at an epoch's end in a 300-step
            run cost ~20% of it on the H100). Saves and evaluations add up in `paused_s`; compiles have
            `compile_s` of their own."""
            if not compiling:
                self.paused_s += seconds
            if self.warm_time and self.steady is None and step >= self.warm_step:
                self.steady_paused_s += seconds

        def on_step_begin(self, args, state, control, **kw):
            self.step = state.global_step + 1  # the step now running
            if self.first_step_at is None:
                self.first_step_at = time.time()  # wall clock: compared with the process's start time

        def on_train_begin(self, args, state, control, **kw):
            # counted from the first step of this session: a resumed run starts past step 0
            self.start_step = state.global_step
            self.warm_step = state.global_step + max(1, min(20, (state.max_steps - state.global_step) // 5))
            self.watch_compiles(True)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (self.warm_step, state.max_steps):
                now = _device_clock(device)  # one host sync at each of the two timing points only
                if state.global_step == self.warm_step:
                    self.warm_time = now
                elif state.max_steps > self.warm_step:
                    steps = state.max_steps - self.warm_step
                    self.steady = steps * self.per_step / (now - self.warm_time - self.steady_paused_s)

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

        def floating_point_ops(self, inputs):
            # The Trainer's total_flos, counted as it counts them (6 x tokens x non-embedding weights), with the
            # weight count taken once: its own walks every module of the model at every step.
            ids = inputs.get(getattr(self.model, "main_input_name", "input_ids")) if isinstance(inputs, Mapping) else None
            if not torch.is_tensor(ids) or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if getattr(self, "_hpml_flop_weights", None) is None:
                self._hpml_flop_weights = self.model.num_parameters(exclude_embeddings=True)
            return 6 * ids.numel() * self._hpml_flop_weights

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            # A checkpoint save or an evaluation between steps is timed apart (after the queued steps finish),
            # so the steady step rate measures training steps only.
            pausing = self.control.should_save or self.control.should_evaluate
            if not pausing or (watch := progress_of(self)) is None:
                return super()._maybe_log_save_evaluate(*args, **kwargs)
            t0 = _device_clock(self.args.device)
            watch.pausing = True
            try:
                out = super()._maybe_log_save_evaluate(*args, **kwargs)
            finally:
                watch.pausing = False
            watch.pause(_device_clock(self.args.device) - t0, self.state.global_step)
            return out

        def _unsharded(self) -> bool:
            from accelerate.utils import DistributedType

            return self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                         DistributedType.MULTI_CPU)

        def training_step(self, model, *args, **kwargs):
            if "_hpml_modules" not in model.__dict__ and self._unsharded():
                flat_module_walks(model)
            return super().training_step(model, *args, **kwargs)

        def _clip_grad_norm(self, model):
            # Same clip as accelerate's, over a parameter list taken once: accelerate walks model.parameters()
            # and checks each gradient for DTensor at every step (~3 ms of host time per step on the H100,
            # more than the packed step's kernels leave). Sharded setups keep the Trainer's own path.
            if not self._unsharded():
                return super()._clip_grad_norm(model)
            if getattr(self, "_hpml_clip_params", None) is None:
                self._hpml_clip_params = [p for p in model.parameters() if p.requires_grad]
            self.accelerator.unscale_gradients()  # fp16's GradScaler; a no-op otherwise
            return torch.nn.utils.clip_grad_norm_(self._hpml_clip_params, self.args.max_grad_norm)

        hpml_dynamic_widths = False  # compiled pad-to-longest variants (modeling.dynamic_widths)

        def _prepare_inputs(self, inputs):
            inputs = super()._prepare_inputs(inputs)
            if self.hpml_dynamic_widths and isinstance(inputs, Mapping):
                modeling.mark_dynamic(inputs)
            return inputs

        def _prepare_input(self, data):
            # Batches come from pinned memory (workers + pin_memory): copy them without blocking the host, so
            # the next step's launches overlap this one's kernels (the Trainer's own copy is blocking: a sync
            # per step, since it waits for every kernel queued before it).
            if isinstance(data, torch.Tensor) and data.device.type == "cpu" and self.args.device.type == "cuda":
                return data.to(self.args.device, non_blocking=True)
            return super()._prepare_input(data)

    return HpmlTrainer


def flat_module_walks(model) -> None:
    """The Trainer calls `model.train()` before every step and `model.zero_grad()` after it. Both walk every
    submodule recursively (bert-base: 227 modules, 199 weights), ~3 ms of host time per step on the H100 and
    ~6 ms on a 2-core CPU, where a flat pass over lists taken once costs ~0.2 ms. This gives the model (the
    object the Trainer steps: a compiled wrapper too) those two methods with the lists: `train(mode)` does
    nothing when every module is already in that mode (checked over all of them, so a mode set on an inner
    module, e.g. the evaluation's `eval()` on the unwrapped model, is still undone) and walks as before
    otherwise; `zero_grad()` sets each weight's gradient to None, as `Module.zero_grad` does by default."""
    import types

    d = model.__dict__  # instance attributes, set past nn.Module's (and OptimizedModule's) __setattr__
    d["_hpml_modules"] = list(model.modules())
    d["_hpml_params"] = list(model.parameters())
    d["train"] = types.MethodType(_flat_train, model)  # bound methods: a deepcopy binds them to the copy
    d["zero_grad"] = types.MethodType(_flat_zero_grad, model)


def _flat_train(self, mode: bool = True):
    if all(m.training == mode for m in self.__dict__["_hpml_modules"]):
        return self
    return type(self).train(self, mode)


def _flat_zero_grad(self, set_to_none: bool = True) -> None:
    if not set_to_none:
        return type(self).zero_grad(self, set_to_none)
    for p in self.__dict__["_hpml_params"]:
        p.grad = None


def progress_of(trainer):
    """The trainer's MlflowProgress (make_callback); None for trainers built with callbacks of their own (the
    VRAM probe, the eval-memory reload)."""
    return next((c for c in trainer.callback_handler.callbacks if hasattr(c, "steady")), None)


def _device_clock(device) -> float:
    """perf_counter after the device's queued work has finished (CUDA), so a pause is timed by itself."""
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
    return _now()


def collator(tokenizer, cfg: TrainConfig, variant: Variant) -> Collator:
    """The one place the batch collator is chosen (training, evaluation and eval-memory reload share it)."""
    return Collator(tokenizer.pad_token_id, cfg.max_length, variant.batching)


def build_trainer(spec: TaskSpec, variant: Variant, cfg: TrainConfig, built: modeling.Built, prep: Prepared,
                  out_dir: str, device: str, callbacks: Optional[list] = None, **overrides):
    per_epoch = spec.epoch_metrics is not None and prep.eval_features is not None
    args = training_arguments(cfg, variant, built, out_dir, device, per_epoch, **overrides)
    if variant.batching.padding == "packed":
        from hpml import packing

        trainer = packing.build_packed_trainer(trainer_class(), built, prep.train, cfg, args, device,
                                               make_callback)
        trainer.add_callback(signals.stop_callback())  # a first signal stops at a step with a checkpoint
        return trainer
    if callbacks is None:  # a first signal stops at a step with a checkpoint
        callbacks = [make_callback(cfg.batch_size, device), signals.stop_callback()]
    trainer = trainer_class()(model=built.model, args=args, train_dataset=prep.train,
                              eval_dataset=spec.eval_inputs(prep) if per_epoch else None,
                              data_collator=collator(built.tokenizer, cfg, variant),
                              compute_metrics=spec.epoch_metrics if per_epoch else None,
                              callbacks=callbacks)
    trainer.hpml_dynamic_widths = modeling.dynamic_widths(variant) and args.torch_compile
    return trainer


def ran_with(trainer) -> dict[str, str]:
    """Tags of what really ran, read from the trained objects rather than from the variant's wishes."""
    import torch._dynamo

    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    wrapped = trainer.model_wrapped
    compiled = isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule)
    return {tracking.TAG_ATTENTION: str(getattr(base.config, "_attn_implementation", "unknown")),
            tracking.TAG_COMPILED: (trainer.args.torch_compile_backend or "inductor") if compiled else "no"}


def eval_vram(export_dir: str, spec: TaskSpec, variant: Variant, cfg: TrainConfig, prep: Prepared,
              arguments: dict, out_dir: str) -> dict[str, float]:
    """As the study: the saved checkpoint reloaded alone on the GPU, then evaluated exactly as evaluation
    runs (the same Trainer arguments: autocast, compile; the same collator and padding)."""
    memory.free_cuda()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded = export.load_export(export_dir, device="cuda")
    after_load = memory.mib(torch.cuda.memory_allocated() - base)
    reloaded = modeling.Built(loaded.model, loaded.tokenizer, "", False, None, "", arguments)
    trainer = build_trainer(spec, variant, cfg, reloaded, prep, out_dir, "cuda", callbacks=[])
    os.makedirs(out_dir, exist_ok=True)
    evaluate(trainer, spec, prep, cfg, out_dir)  # the same path as the run's evaluation (packed variants: packed)
    torch.cuda.synchronize()
    peak = memory.mib(torch.cuda.max_memory_allocated() - base)
    del trainer, loaded, reloaded
    memory.free_cuda()
    return {tracking.M_VRAM_AFTER_LOAD: after_load, tracking.M_PEAK_EVAL_VRAM: peak}


# ---- the run ---------------------------------------------------------------------------------------------
def resolve_params(cfg: TrainConfig, variant: Variant, precision: str) -> dict[str, object]:
    """The configuration the run really used: defaults filled in, variant settings flattened."""
    params = {k: v for k, v in cfg.declared().items() if k != "resume"}  # a resumed run keeps its params
    params["lr"] = cfg.lr if cfg.lr is not None else variant.optimizer.lr
    params["precision"] = precision
    return {**{f"resolved.{k}": v for k, v in params.items()}, **variant.to_params()}


def run_training(cfg: TrainConfig, inputs: Optional[dict[str, object]] = None) -> dict[str, object]:
    """Train, evaluate, log and register one variant. Returns a summary (metrics, run id, registry version)."""
    started = training_started()
    if cfg.resume:  # the run's own configuration replaces the options given
        tracking.connect()
        cfg = checkpoints.to_resume(cfg.resume, cfg.task)
    spec = get_task(cfg.task)
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
            prep = spec.prepare(cfg, tokenizer, cache_dir())
        tags = {tracking.TAG_VARIANT: variant.id, tracking.TAG_PURPOSE: cfg.purpose,
                tracking.TAG_FINGERPRINT: prep.fingerprint, tracking.TAG_PRECISION: precision}
        params = resolve_params(cfg, variant, precision)
        tags[tracking.TAG_CONFIG_HASH] = config_hash(params)
        tags[tracking.TAG_RECIPE] = recipe_hash(params, prep.fingerprint)
        tags[tracking.TAG_DESCRIPTION] = describe(cfg, variant)
        if hidden := lean.hidden():
            tags[tracking.TAG_HIDDEN_IMPORTS] = ",".join(hidden)
        if not dist.is_main:  # data-parallel ranks > 0 train and evaluate alongside rank 0, never track
            return _train_in_run(spec, variant, cfg, prep, device, work, "", tags, started)
        with tracking.run(cfg.task, variant.id, cfg.experiment, tags, inputs or {}, params,
                          system_metrics=tracking.system_metrics_wanted(device), resume_run_id=cfg.resume) as run_id:
            launch.record_run_id(run_id)
            tracking.log_datasets(dataset_inputs(cfg))
            return _train_in_run(spec, variant, cfg, prep, device, work, run_id, tags, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_samples_per_s(trainer, result, progress) -> float:
    """Trainer's samples/s counts batch_size rows per step; a packed step holds a varying number of features
    (packs of max_tokens), so packed runs count this session's steps times the packs' average features."""
    runtime = result.metrics["train_runtime"]
    if getattr(trainer, "hpml_sampler", None) is None or not runtime:
        return result.metrics["train_samples_per_second"]
    return (trainer.state.global_step - progress.start_step) * progress.per_step / runtime


_STARTED: list[float] = []  # when the first training of this process began: its process's start time


def training_started() -> float:
    """What `startup_s` counts from (wall clock): the process's start for its first training (imports, data,
    model and Trainer setup), the call itself for later ones in the same process (the demo, in-process tests)."""
    import psutil

    if not _STARTED:
        _STARTED.append(psutil.Process().create_time())
        return _STARTED[0]
    return time.time()


def _train_in_run(spec, variant, cfg, prep, device, work, run_id, tags, started: float) -> dict[str, object]:
    main = launch.context().is_main
    memory.reset_peak(device)
    built = modeling.apply_techniques(variant, spec, cfg.model, work, cfg.seed, device)
    if main:
        tracking.log_metrics(built.counts.as_metrics())
    # Resumable checkpoints need a folder every rank knows before the run exists: single-process runs only.
    resumable = not launch.context().distributed
    ckpt_dir = checkpoints.run_dir(cfg, run_id) if resumable else os.path.join(work, "trainer")
    if resumable:
        tracking.set_tags({tracking.TAG_CHECKPOINT_DIR: ckpt_dir})
    trainer = build_trainer(spec, variant, cfg, built, prep, ckpt_dir, device)
    resume_from = checkpoints.last_checkpoint(ckpt_dir) if (cfg.resume and resumable) else None
    if resume_from:
        tracking.set_tags({tracking.TAG_RESUMED_AT: os.path.basename(resume_from).split("-")[-1]})
    trainer.start_from(resume_from)
    progress = progress_of(trainer)
    try:
        with signals.deferred():  # a first SIGINT/SIGTERM stops at the next step with a checkpoint, then raises
            result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        progress.watch_compiles(False)  # a failed run must not leave its hooks in torch
    if main:
        tracking.set_tags(ran_with(trainer))
    last_epoch = max(1, int(round(trainer.state.epoch or 0)))  # final metrics sit at the last epoch's step
    # Summed over every step, those before a resume included (Trainer's own mean covers this session only).
    # Data-parallel runs cannot resume: Trainer's own mean is already averaged over the ranks there (the
    # local sum holds this rank's half of each batch only).
    train_loss = (trainer.loss_sum() / max(1, trainer.state.global_step) if resumable
                  else result.training_loss)
    metrics = {tracking.M_TRAIN_LOSS: train_loss,
               tracking.M_TRAIN_STEADY_SPS: progress.steady,
               tracking.M_PAUSED: progress.paused_s,
               tracking.M_COMPILE: progress.compile_s,
               tracking.M_RECOMPILES: progress.recompiles,
               # every session's training time (a resumed run's earlier sessions up to their last checkpoint)
               tracking.M_TRAIN_RUNTIME: (trainer.train_seconds(result.metrics["train_runtime"]) if resumable
                                          else result.metrics["train_runtime"]),
               tracking.M_TRAIN_SPS: train_samples_per_s(trainer, result, progress),
               **launch.max_over_ranks(memory.peak_train(device))}  # per-GPU peak: the max over ranks
    if progress.first_step_at is not None:  # None: resumed at the last step, nothing left to train
        metrics[tracking.M_STARTUP] = progress.first_step_at - started
    artifacts = os.path.join(work, "artifacts")
    os.makedirs(artifacts)
    metrics.update(evaluate(trainer, spec, prep, cfg, artifacts))  # every rank: predict gathers across ranks
    if not main:
        return {"run_id": "", "variant": variant.id, "metrics": metrics}
    export_dir = export.write_export(
        os.path.join(work, "export"), built.model, built.tokenizer, spec=spec, variant=variant,
        base_ref=built.base_path, base_is_local_copy=built.base_is_materialized, settings=spec.export_settings(cfg))
    if device == "cuda":
        del trainer
        built.model = None
        metrics.update(eval_vram(export_dir, spec, variant, cfg, prep, built.arguments, os.path.join(work, "eval")))
    tracking.log_metrics(metrics, step=last_epoch)  # buffered on a server, like every metric before it
    end = outage.Ending(run_id=run_id, task=spec.name, variant=variant.id, register=cfg.register,
                        quantized=variant.precision.quantization is not None, headline=spec.headline,
                        metrics=metrics, tags=tags, artifacts_dir=artifacts,
                        export_dir=export_dir if cfg.register else "", checkpoint_dir=ckpt_dir if resumable else "")
    # Artifacts, registration, checkpoints deleted; a server still away saves all that under output_dir.
    summary: dict[str, object] = {"run_id": run_id, "variant": variant.id, "metrics": metrics}
    summary.update(outage.finish(end, checkpoints.run_dir(cfg, run_id)))
    return summary
