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


def _head(bias: bool) -> torch.nn.Linear:
    torch.manual_seed(6)
    head = torch.nn.Linear(16, 37, bias=bias)
    with torch.no_grad():
        head.weight.mul_(4)
    return head


@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_the_blockwise_head_gives_the_loss_and_gradients_of_whole_logits(chunk: int, kind: str) -> None:
    """Loss and gradients (hidden states, a trained head's weight and bias) equal autograd through the head's whole
    ``[N, V]`` logits and the reference loss (float32)."""
    from lowbit.methods.losses import HeadSplit, head_loss

    head = _head(bias=True)
    hidden = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(7), requires_grad=True)
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(8))
    teacher = logits(9).reshape(-1, 37)
    ours = head_loss(HeadSplit(torch.nn.Identity(), head), hidden, ids,
                     (lambda rows: teacher[rows]) if kind == "kl" else None, chunk)
    (2.0 * ours).backward()
    got = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    z = head(hidden)
    if kind == "kl":
        logq, logp = torch.log_softmax(z, -1), torch.log_softmax(teacher.reshape(2, 9, 37), -1)
        reference = (logp.exp() * (logp - logq)).sum(-1).mean()
    else:
        reference = torch.nn.functional.cross_entropy(z[:, :-1].reshape(-1, 37), ids[:, 1:].reshape(-1))
    (2.0 * reference).backward()
    assert float(ours) == pytest.approx(float(reference), rel=1e-6)
    assert float(reference) > 0.5
    for mine, theirs in zip(got, (hidden.grad, head.weight.grad, head.bias.grad)):
        assert float(theirs.abs().max()) > 1e-3
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_the_blockwise_head_under_bfloat16_autocast_matches_autocast_logits() -> None:
    """Under autocast the head runs in bfloat16 as autocast's linear does: the loss and the hidden states' gradient
    equal the whole-logits path's (bfloat16 logits, bfloat16 logits gradient)."""
    from lowbit.methods.losses import HeadSplit, head_loss

    head = _head(bias=False).requires_grad_(False)
    hidden = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(10), requires_grad=True)
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = head_loss(HeadSplit(torch.nn.Identity(), head), hidden, ids, chunk=4)
    ours.backward()
    got, hidden.grad = hidden.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = next_token_loss(head(hidden), ids, 4)
    whole.backward()
    assert float(ours) == pytest.approx(float(whole), rel=1e-6)
    torch.testing.assert_close(got, hidden.grad, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "opt", "gpt2"])
def test_models_whose_logits_are_head_of_decoder_output_are_split(arch: str) -> None:
    from conftest import make_tiny

    from lowbit.methods.losses import split_head

    model = make_tiny(arch)
    probe = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    split = split_head(model, probe)
    assert split.head is model.get_output_embeddings()
    with torch.no_grad():
        assert torch.equal(split.head(split.hidden(probe)), model(probe).logits)


def test_a_model_that_soft_caps_its_logits_keeps_whole_logits() -> None:
    """Gemma 2 applies tanh soft-capping after its head: no split (its logits are not head(decoder output))."""
    import transformers

    from lowbit.methods.losses import split_head

    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                       final_logit_softcapping=30.0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert split_head(model, torch.randint(0, 512, (1, 16))) is None
    model.config.final_logit_softcapping = None  # the same model without its cap splits
    assert split_head(model, torch.randint(0, 512, (1, 16))).head is model.get_output_embeddings()


def test_blocks_of_positions_shrink_for_large_vocabularies() -> None:
    from lowbit.methods.losses import BLOCK_BYTES, CHUNK, _rows

    assert _rows(None, 49152) == CHUNK == 256  # SmolLM2: 50 MB per float32 block
    assert _rows(None, 128256) == 130 and 130 * 128256 * 4 <= BLOCK_BYTES  # Llama 3
    assert _rows(None, 10**9) == 1 and _rows(7, 128256) == 7
