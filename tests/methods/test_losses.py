"""The block-wise training losses equal the textbook expressions and their autograd gradients."""

from __future__ import annotations

import pytest
import torch

from lowbit.methods.losses import kl_loss, next_token_loss


def logits(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (3 * torch.randn(2, 9, 37, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_kl_and_its_gradient_equal_autograd(chunk: int) -> None:
    student, teacher = logits(0).requires_grad_(), logits(1)
    ours = kl_loss(student, teacher, chunk)
    ours.backward()
    ours_grad = student.grad.clone()
    student.grad = None
    logq, logp = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    reference = (logp.exp() * (logp - logq)).sum(-1).mean()
    reference.backward()
    assert float(ours) == pytest.approx(float(reference), rel=1e-6)
    assert float(ours) > 0.5  # really different distributions
    torch.testing.assert_close(ours_grad, student.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_next_token_loss_and_its_gradient_equal_autograd(chunk: int) -> None:
    student = logits(2).requires_grad_()
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(3))
    (3.0 * next_token_loss(student, ids, chunk)).backward()  # a scaled loss scales the gradient
    ours_grad = student.grad.clone()
    student.grad = None
    reference = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 37), ids[:, 1:].reshape(-1))
    (3.0 * reference).backward()
    assert float(next_token_loss(student, ids, chunk)) == pytest.approx(float(reference), rel=1e-6)
    torch.testing.assert_close(ours_grad, student.grad, rtol=1e-5, atol=1e-7)
    assert float(student.grad[:, -1].abs().max()) == 0.0  # the last position predicts nothing


def test_bfloat16_logits_get_a_bfloat16_gradient_of_the_float32_loss() -> None:
    student, teacher = logits(4, torch.bfloat16).requires_grad_(), logits(5, torch.bfloat16)
    loss = kl_loss(student, teacher, 3)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    logq, logp = torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1)
    assert float(loss) == pytest.approx(float((logp.exp() * (logp - logq)).sum(-1).mean()), rel=1e-6)
