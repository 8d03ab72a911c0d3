"""The fused loss scales its stored gradients in place: one backward per forward, refused clearly after."""
import pytest
import torch

import triton_helpers  # noqa: F401 - skips where the Triton interpreter cannot run
from fastvae.functional import bce_kl_loss


def test_second_backward_through_the_fused_loss_is_refused():
    logits = torch.randn(5, 13, requires_grad=True)
    x, mu, logvar = torch.rand(5, 13), torch.randn(5, 3), torch.randn(5, 3)
    loss = bce_kl_loss(logits, x, mu, logvar, backend="triton")
    loss.backward(retain_graph=True)
    expected = torch.sigmoid(logits.detach()) - x
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
