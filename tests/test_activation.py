"""`moa.layers.activation.gelu`: exact GELU, on PyTorch's own kernel for small inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from moa.layers.activation import NATIVE_MAX_NUMEL, gelu


class OneDNNAtGELU(TorchFunctionMode):
    """Records whether oneDNN was on at each `F.gelu` call."""

    def __init__(self) -> None:
        super().__init__()
        self.onednn: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.gelu:
            self.onednn.append(torch.backends.mkldnn.enabled)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(1, 1, 37), (3, 5, 128), (NATIVE_MAX_NUMEL,),
                                   (NATIVE_MAX_NUMEL + 1,), (4, 64, 96)])
def test_gelu_is_exact_gelu_forward_and_backward(shape):
    x64 = torch.randn(shape, dtype=torch.float64) * 3
    x = x64.float().requires_grad_()
    y = gelu(x)
    grad = torch.randn(shape)
    (dx,) = torch.autograd.grad(y, x, grad)
    x_ref = x64.float().double().requires_grad_()
    y_ref = F.gelu(x_ref)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, grad.double())
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_small_inputs_skip_onednn_and_large_ones_keep_it():
    with OneDNNAtGELU() as seen:
        gelu(torch.randn(1, 1, 512))
        gelu(torch.randn(NATIVE_MAX_NUMEL))
        gelu(torch.randn(NATIVE_MAX_NUMEL + 1))
    assert seen.onednn == [False, False, True]
    assert torch.backends.mkldnn.enabled


def test_the_onednn_switch_is_restored_after_an_error():
    with pytest.raises(RuntimeError):
        gelu(torch.ones(3, dtype=torch.long))
    assert torch.backends.mkldnn.enabled
