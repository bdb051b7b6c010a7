from __future__ import annotations

import math

import pytest
import torch

from genq_core.quant.calibration import minmax_range
from genq_core.quant.functional import (
    fake_quantize,
    lp_loss,
    qparams_from_range,
    quant_range,
    rectified_sigmoid,
    round_ste,
    rounding_regularizer,
    sqnr_db,
)


def test_quant_range() -> None:
    assert quant_range(8, signed=True) == (-128, 127)
    assert quant_range(8, signed=False) == (0, 255)
    assert quant_range(2, signed=True) == (-2, 1)
    assert quant_range(4, signed=False) == (0, 15)


@pytest.mark.parametrize("bits", [0, 1, 17, 3.5, True])
def test_quant_range_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        quant_range(bits, signed=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_fake_quantize_sqnr_grows_six_db_per_bit(bits: int, symmetric: bool) -> None:
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_min, x_max = minmax_range(x, axis=None)
    scale, zp = qparams_from_range(x_min, x_max, bits, symmetric, signed=symmetric)
    qmin, qmax = quant_range(bits, signed=symmetric)
    x_hat = fake_quantize(x, scale, zp, qmin, qmax)
    # uniform data over the full grid: SQNR = 6.02 b dB (+/- grid edge effects)
    # (at 2 bits, keeping zero exactly on the grid costs a few dB)
    expected = 6.02 * bits
    tolerance = 4.0 if bits == 2 else 1.5
    assert expected - tolerance < sqnr_db(x, x_hat) < expected + 1.5
    assert len(torch.unique(x_hat)) <= 2**bits


def test_fake_quantize_values_on_grid_and_zero_exact() -> None:
    x = torch.tensor([-1.0, -0.3, 0.0, 0.26, 2.0])
    scale, zp = qparams_from_range(torch.tensor([-1.0]), torch.tensor([1.0]), 3, False, False)
    x_hat = fake_quantize(x, scale, zp, 0, 7)
    codes = x_hat / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert x_hat[2] == 0.0
    assert x_hat[-1] == pytest.approx(((7 - zp) * scale).item())  # clipped to the grid's top


def test_per_channel_beats_per_tensor_on_uneven_channels() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=gen) * torch.logspace(-2, 0, 8)[:, None]
    qmin, qmax = quant_range(4, signed=True)
    lo, hi = minmax_range(w, axis=0)
    s_c, z_c = qparams_from_range(lo, hi, 4, symmetric=True, signed=True)
    lo_t, hi_t = minmax_range(w, axis=None)
    s_t, z_t = qparams_from_range(lo_t, hi_t, 4, symmetric=True, signed=True)
    per_channel = sqnr_db(w, fake_quantize(w, s_c, z_c, qmin, qmax, axis=0))
    per_tensor = sqnr_db(w, fake_quantize(w, s_t, z_t, qmin, qmax, axis=None))
    assert per_channel > per_tensor + 3.0
    assert torch.all(z_c == 0)


def test_unsigned_symmetric_zero_point_is_centre() -> None:
    scale, zp = qparams_from_range(torch.tensor([-2.0]), torch.tensor([1.0]), 8, True, False)
    assert zp.item() == 128
    assert scale.item() == pytest.approx(2.0 / 127.5)


def test_round_ste_passes_gradient_through() -> None:
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert torch.equal(y, torch.tensor([0.0, 2.0, -2.0]))
    assert x.grad is not None and torch.equal(x.grad, torch.ones(3))


def test_fake_quantize_gradients_reach_input_and_scale() -> None:
    x = torch.tensor([0.1, 0.5, 5.0], requires_grad=True)
    scale = torch.tensor([0.1], requires_grad=True)
    fake_quantize(x, scale, torch.zeros(1), 0, 15).sum().backward()
    assert x.grad is not None and scale.grad is not None
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped element gets no gradient
    assert scale.grad.abs().item() > 0


def test_rounding_regularizer_zero_at_binary_and_max_at_half() -> None:
    decided = torch.tensor([-10.0, 10.0])
    undecided = torch.tensor([0.0])
    assert rounding_regularizer(decided, beta=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert rounding_regularizer(undecided, beta=2.0).item() == pytest.approx(1.0, abs=1e-6)
    h = rectified_sigmoid(torch.tensor([-10.0, 0.0, 10.0]))
    assert h.tolist() == pytest.approx([0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="beta"):
        rounding_regularizer(undecided, beta=0.0)


def test_lp_loss_sums_channels_and_averages_rest() -> None:
    pred = torch.zeros(2, 3, 4, 4)
    target = torch.ones(2, 3, 4, 4)
    assert lp_loss(pred, target, p=2.0).item() == pytest.approx(3.0)
    assert lp_loss(pred[:, :, 0, 0], target[:, :, 0, 0]).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        lp_loss(pred, target[:1])


def test_sqnr_db_edge_cases() -> None:
    x = torch.ones(4)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 0.9) == pytest.approx(20.0)
