"""The steady training rate measures training steps only: checkpoint saves, evaluations and compiles that
fall between its two timing points are timed apart, counted and logged on their own."""
import time
from types import SimpleNamespace

from hpml import tracking
from hpml.config import TrainConfig
from hpml.training import run_training


def test_steady_rate_leaves_out_checkpoint_saves(sst2_dir, tracking_uri, tmp_path, monkeypatch):
    # Saves are slow here (1 s each); two fall between the steady rate's timing points (steps 2 and 12).
    from transformers import Trainer

    from hpml import training

    real_save = Trainer._save_checkpoint

    def slow_save(self, model, trial):
        time.sleep(1.0)
        return real_save(self, model, trial)

    made = []
    real_callback = training.make_callback
    monkeypatch.setattr(training, "make_callback", lambda *a: made.append(real_callback(*a)) or made[-1])
    monkeypatch.setattr(Trainer, "_save_checkpoint", slow_save)
    c = TrainConfig(task="sst2", variant="fp32", model="random:tiny", data_dir=str(sst2_dir), max_steps=12,
                    batch_size=4, eval_batch_size=16, max_length=32, purpose="test", experiment="hpml-sst2",
                    save_steps=4, register=False, output_dir=str(tmp_path / "o"))
    m = run_training(c)["metrics"]
    assert m[tracking.M_PAUSED] >= 3.0  # saves at steps 4, 8 and 12
    [progress] = made
    assert progress.steady_paused_s >= 2.0  # those at 4 and 8 are left out of the steady rate's window,
    assert progress.paused_s - progress.steady_paused_s >= 1.0  # the last one came after it closed


def test_steady_rate_arithmetic_subtracts_pauses_inside_its_window(monkeypatch):
    from hpml import training

    clock = iter([100.0, 110.0])
    monkeypatch.setattr(training, "_now", lambda: next(clock))
    cb = training.make_callback(4, "cpu")
    state = SimpleNamespace(global_step=0, max_steps=12)
    cb.on_train_begin(None, state, None)
    try:
        cb.pause(5.0, 1)  # before the warm-up step: not in the window
        state.global_step = 2
        cb.on_step_end(None, state, None)  # t = 100
        cb.pause(1.5, 4)
        state.global_step = 12
        cb.on_step_end(None, state, None)  # t = 110
        cb.pause(2.0, 12)  # the final save, after the window closed
    finally:
        cb.on_train_end(None, state, None)
    assert cb.steady == 10 * 4 / (10.0 - 1.5) and cb.paused_s == 8.5


def test_compiles_after_warmup_are_counted_and_left_out_of_the_steady_rate(monkeypatch):
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    from hpml import training

    clock = iter([90.0, 95.0, 100.0, 101.0, 104.0, 110.0, 112.0, 120.0])
    monkeypatch.setattr(training, "_now", lambda: next(clock))
    cb = training.make_callback(4, "cpu")
    state = SimpleNamespace(global_step=0, max_steps=12)
    cb.on_train_begin(None, state, None)

    def step(n, compile_trigger=None):
        state.global_step = n - 1
        cb.on_step_begin(None, state, None)
        if compile_trigger is not None:
            with callback_handler.install_callbacks(compile_trigger, "0/0"):
                pass
        state.global_step = n
        cb.on_step_end(None, state, None)

    try:
        step(1, CallbackTrigger.DYNAMO)  # 90-95: the first compile, a warm-up step
        step(2)  # warm-up ends: t = 100
        step(5, CallbackTrigger.DYNAMO)  # 101-104: a new graph mid-run (a new padded width)
        step(6, CallbackTrigger.LAZY_BACKWARD)  # 110-112: its backward, compiled when first needed
        step(12)  # t = 120
    finally:
        cb.on_train_end(None, state, None)
    assert cb.compile_s == 10.0 and cb.recompiles == 1
    assert cb.steady == 10 * 4 / (20.0 - 3.0 - 2.0)
    assert cb.paused_s == 0.0  # compiles are not saves or evaluations (train_checkpoint_eval_s)
    assert cb._compile_start not in callback_handler.start_callbacks  # hooks gone with the training


def test_a_compiled_run_logs_its_compile_time_and_recompiles(squad_dir, tracking_uri):
    from torch._dynamo.callback import callback_handler

    before = list(callback_handler.start_callbacks)
    m = run_training(TrainConfig(task="squad", variant="a3", model="random:tiny", data_dir=str(squad_dir),
                                 batch_size=4, eval_batch_size=16, max_length=128, doc_stride=32, max_steps=6,
                                 max_eval_samples=8, purpose="test", register=False))["metrics"]
    assert m[tracking.M_COMPILE] > 0 and m[tracking.M_RECOMPILES] == 0  # a3 pads to max_length: one shape
    assert callback_handler.start_callbacks == before
