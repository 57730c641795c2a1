import pytest
import torch

from model import emd_loss, emd_per_sample


def plain_emd(p, q, r):
    """The definition, one sample and one bin at a time."""
    total = 0.0
    for i in range(p.shape[0]):
        cdf_p = cdf_q = 0.0
        acc = 0.0
        for k in range(p.shape[1]):
            cdf_p += float(p[i, k])
            cdf_q += float(q[i, k])
            acc += abs(cdf_p - cdf_q) ** r
        total += (acc / p.shape[1]) ** (1.0 / r)
    return total / p.shape[0]


@pytest.mark.parametrize("r", [1, 2])
def test_emd_matches_plain_definition(r):
    g = torch.Generator().manual_seed(r)
    p = torch.rand(64, 10, generator=g).softmax(1)
    q = torch.rand(64, 10, generator=g)
    q = q / q.sum(1, keepdim=True)
    assert abs(emd_loss(p, q, r=r).item() - plain_emd(p.double(), q.double(), r)) < 1e-6


def test_emd_accepts_trailing_unit_dim_and_is_zero_on_equal_inputs():
    p = torch.rand(5, 10).softmax(1)
    q = torch.rand(5, 10).softmax(1)
    assert torch.allclose(emd_loss(p.unsqueeze(-1), q.unsqueeze(-1)), emd_loss(p, q))
    assert abs(emd_loss(p.unsqueeze(-1), q.unsqueeze(-1)).item() - plain_emd(p.double(), q.double(), 2)) < 1e-6
    # emd_per_sample: one value per sample, each the definition's on that sample alone.
    per = emd_per_sample(p, q)
    assert per.shape == (5,)
    for i in range(5):
        assert abs(per[i].item() - plain_emd(p[i:i + 1].double(), q[i:i + 1].double(), 2)) < 1e-6
    assert emd_loss(p, p).item() == 0.0


def test_emd_hand_computed_case():
    # all mass on rating 1 vs all on rating 10: CDF gap is 1 on bins 1..9 and 0 on bin 10
    p = torch.zeros(1, 10); p[0, 0] = 1
    q = torch.zeros(1, 10); q[0, 9] = 1
    assert emd_per_sample(p, q, r=1).item() == pytest.approx(0.9)
    assert emd_per_sample(p, q, r=2).item() == pytest.approx(0.9 ** 0.5)


def test_emd_is_float32_under_bfloat16_inputs_and_backpropagates():
    logits = torch.randn(4, 10, requires_grad=True)
    q = torch.rand(4, 10).softmax(1)
    loss = emd_loss(logits.bfloat16().softmax(1), q)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_emd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        emd_loss(torch.rand(2, 10), torch.rand(3, 10))
