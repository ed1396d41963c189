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
@pytest.mark.parametrize("variant", ["a3", "c1", "c2", "qlora"])
def test_probe_on_cuda_logs_the_split(variant, tracking_uri):
    m = run_probe(ProbeConfig(variant=variant, model="random:tiny", purpose="test"))
    parts = [m[k] for k in (tracking.M_MEM_PARAMS, tracking.M_MEM_GRADS, tracking.M_MEM_OPTIMIZER,
                            tracking.M_MEM_ACTIVATIONS)]
    assert 0 < m[tracking.M_PROBE_ALLOC] <= m[tracking.M_PROBE_RESERVED] < m[tracking.M_DEVICE_TOTAL]
    assert sum(parts) == pytest.approx(m[tracking.M_PROBE_ALLOC], rel=1e-6)
