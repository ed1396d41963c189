"""vram_probe: refuses a CPU with one line; on CUDA, logs the study's three numbers and the memory split."""
import pytest
import torch
from mlflow import MlflowClient

from hpml import tracking
from hpml.errors import UsageError
from hpml.probe import ProbeConfig, optimizer_state_bytes, resolve, run_probe

from conftest import last_line, mlflow_run, run_cmd


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cpu_refusal_is_one_line_exit_2_and_no_run(tracking_uri):
    out = run_cmd(["hpml", "vram-probe", "--variant", "a3", "--model", "random:tiny"])
    assert out.returncode == 2
    assert last_line(out.stderr) == ("hpml: error: vram_probe measures CUDA memory and needs a GPU: run it on a "
                                     "GPU machine (this one has no CUDA device)")
    run = mlflow_run("vram_probe", {"variant": "c1", "model": "random:tiny"}, experiment="hpml-vram")
    assert run.returncode != 0 and "needs a GPU" in run.stderr
    client = MlflowClient(tracking_uri)
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                if r.info.status == "FINISHED"]


def test_bad_options_are_named():
    with pytest.raises(UsageError, match="variant b3 belongs to task squad, not sst2"):
        resolve(ProbeConfig(variant="b3", task="sst2"))
    with pytest.raises(UsageError, match="precision must be fp16 or bf16"):
        resolve(ProbeConfig(variant="a3", precision="fp32"))


def test_optimizer_state_is_measured_from_tensors():
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(1000)
    opt.step()
    # exp_avg + exp_avg_sq (fp32, 1000 each) + the scalar step tensor
    assert optimizer_state_bytes(opt) == 2 * 4000 + opt.state[p]["step"].element_size()


@pytest.mark.gpu
def test_probe_on_cuda_measures_the_split_from_real_tensors(tracking_uri):
    """Each part is measured, not derived: grads from the .grad tensors before the optimizer step, optimizer
    state from its tensors, params from the model. So they can disagree with the catalog and the peak."""
    m = {v: run_probe(ProbeConfig(variant=v, model="random:tiny", purpose="test")) for v in ("a3", "c1", "b2")}
    for v, got in m.items():
        assert 0 < got[tracking.M_PROBE_ALLOC] <= got[tracking.M_PROBE_RESERVED] < got[tracking.M_DEVICE_TOTAL], v
        assert got[tracking.M_PROBE_ALLOC] >= (got[tracking.M_MEM_PARAMS] + got[tracking.M_MEM_GRADS]
                                               + got[tracking.M_MEM_OPTIMIZER]), v
    a3, c1, b2 = m["a3"], m["c1"], m["b2"]
    trainable_mib = a3[tracking.M_TRAINABLE] * 4 / 2**20  # fp32 master weights: one fp32 gradient each
    assert a3[tracking.M_MEM_GRADS] == pytest.approx(trainable_mib, rel=0.01)
    # AdamW keeps two fp32 moments per trainable weight; 8-bit AdamW two 8-bit ones (+ small quantile maps)
    assert a3[tracking.M_MEM_OPTIMIZER] == pytest.approx(2 * trainable_mib, rel=0.05)
    # transformers' Trainer keeps nn.Embedding weights on 32-bit states under bitsandbytes' 8-bit optimizers
    # (for stability), so on this tiny BERT, whose weights are mostly its embeddings, 8-bit saves little.
    from transformers import BertConfig

    from hpml.modeling import BERT_VOCAB_SIZE, RANDOM_SIZES

    cfg = BertConfig(vocab_size=BERT_VOCAB_SIZE, **RANDOM_SIZES["tiny"])
    emb = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * cfg.hidden_size
    rest = a3[tracking.M_TRAINABLE] - emb
    assert c1[tracking.M_MEM_OPTIMIZER] == pytest.approx((8 * emb + 2 * rest) / 2**20, rel=0.05)
    assert c1[tracking.M_MEM_OPTIMIZER] < a3[tracking.M_MEM_OPTIMIZER]
    # BitFit: only biases and the head have gradients and moments
    assert b2[tracking.M_MEM_GRADS] == pytest.approx(b2[tracking.M_TRAINABLE] * 4 / 2**20, rel=0.01)
    assert b2[tracking.M_MEM_GRADS] < 0.05 * a3[tracking.M_MEM_GRADS]


@pytest.mark.gpu
def test_probe_runs_qlora_through_the_training_pipeline(tracking_uri):
    m = run_probe(ProbeConfig(variant="qlora", model="random:tiny", purpose="test"))
    assert m[tracking.M_MEM_GRADS] == pytest.approx(m[tracking.M_TRAINABLE] * 4 / 2**20, rel=0.01)
    assert m[tracking.M_PROBE_ALLOC] > 0


@pytest.mark.parametrize("variant", ["a2", "b2", "lora"])
def test_probe_step_runs_the_training_pipeline_and_measures_each_part(variant, tmp_path, monkeypatch):
    """The probe's two Trainer steps on this machine, with only CUDA's memory counters stubbed (on a CPU
    there are none): gradients and optimizer state are read from the real tensors, so they must match what
    the variant trains (fp32 gradient per trainable weight; AdamW's two fp32 moments)."""
    from types import SimpleNamespace

    from hpml.probe import measure
    from hpml.variants import get_variant

    if not torch.cuda.is_available():
        for name in ("synchronize", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**30)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a, **k: 4 * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=8 * 2**30))
    v = get_variant(variant)
    cfg = ProbeConfig(variant=variant, model="random:tiny", batch_size=2, precision="bf16")
    m = measure(v, v.task, cfg, 32, str(tmp_path), "cuda" if torch.cuda.is_available() else "cpu")
    trainable_mib = m[tracking.M_TRAINABLE] * 4 / 2**20
    assert m[tracking.M_MEM_GRADS] == pytest.approx(trainable_mib, rel=1e-6)
    moments = m[tracking.M_MEM_OPTIMIZER] - 2 * trainable_mib  # what is left: AdamW's per-tensor step counters
    assert 0 <= moments < 0.01 * trainable_mib + 0.01
    if variant != "a2":
        assert m[tracking.M_TRAINABLE] < 0.5 * m[tracking.M_TOTAL]
