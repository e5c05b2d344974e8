"""oneDNN-packed fp32 linear layers: the same results as nn.Linear, the same state dict, chosen only on CPU fp32."""

import pytest
import torch
from torch import nn

from medsam2_backend.engine import EngineInputError
from medsam2_backend.engine.cpu_kernels import OneDnnLinear, pack_linear_layers
from medsam2_backend.engine.model import load_model

pytestmark = pytest.mark.sam2


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 16), (7, 2, 16), (2, 4, 6, 16)])
def test_packed_linear_computes_what_linear_computes(shape, bias):
    torch.manual_seed(0)
    dense = nn.Linear(16, 24, bias=bias)
    packed = OneDnnLinear(dense)
    x = torch.randn(*shape)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)
        xt = torch.randn(16, *shape[:-1]).movedim(0, -1)  # non-contiguous input
        torch.testing.assert_close(packed(xt), dense(xt), rtol=1e-5, atol=1e-5)
    assert packed(x).shape == shape[:-1] + (24,)


def test_state_dict_stays_dense_and_loads_back():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3, bias=False)))
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pack_linear_layers(model) == 2 and isinstance(model[2][0], OneDnnLinear)
    state = model.state_dict()
    assert sorted(state) == sorted(dense_state)
    assert all(torch.equal(state[k], dense_state[k]) and not state[k].is_mkldnn for k in state)
    other = {k: torch.full_like(v, 0.5) for k, v in dense_state.items()}
    model.load_state_dict(other, strict=True)
    assert torch.equal(model.state_dict()["2.0.weight"], torch.full((3, 8), 0.5))
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
        model.load_state_dict({**other, "0.weight": torch.zeros(4, 8)})


def test_kernels_default_to_onednn_on_cpu_fp32_only():
    assert load_model(random_weights=True).kernels == "onednn"
    assert load_model(random_weights=True, kernels="torch").kernels == "torch"
    bf16 = load_model(random_weights=True, precision="bf16")
    assert bf16.kernels == "torch" and not any(isinstance(m, OneDnnLinear) for m in bf16.predictor.modules())
    with pytest.raises(EngineInputError, match="not available for cpu bf16"):
        load_model(random_weights=True, precision="bf16", kernels="onednn")
