from __future__ import annotations

import pytest
import torch

from genq_core.quant.calibration import ActivationObserver
from genq_core.quant.functional import sqnr_db
from genq_core.quant.quantizers import ActivationQuantizer, QuantDrop, WeightQuantizer


def _weight() -> torch.Tensor:
    return torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))


def test_weight_quantizer_refuses_use_before_calibrate() -> None:
    wq = WeightQuantizer((6, 4, 3, 3), bits=4, symmetric=False, per_channel=True)
    with pytest.raises(RuntimeError, match="before calibrate"):
        wq(_weight())


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_weight_calibration_sqnr(method: str) -> None:
    w = _weight()
    wq = WeightQuantizer(w.shape, bits=4, symmetric=False, per_channel=True)
    wq.calibrate(w, method)
    assert sqnr_db(w, wq(w)) > 17.0
    with pytest.raises(ValueError, match="method"):
        wq.calibrate(w, "kl")


def test_mse_search_not_worse_than_minmax_with_outliers() -> None:
    w = _weight()
    w[:, 0, 0, 0] = 8.0  # one outlier per channel
    errors = {}
    for method in ("minmax", "mse"):
        wq = WeightQuantizer(w.shape, bits=3, symmetric=True, per_channel=True)
        wq.calibrate(w, method)
        errors[method] = (wq(w) - w).pow(2).mean().item()
    assert errors["mse"] < errors["minmax"]


def test_soft_rounding_starts_at_float_weight() -> None:
    w = _weight()
    wq = WeightQuantizer(w.shape, bits=4, symmetric=False, per_channel=True)
    wq.calibrate(w, "minmax")
    wq.init_rounding(w)
    assert wq.rounding == "soft"
    # h(alpha) = frac(w / s) reproduces w wherever w lies on the grid's span
    scale, zero_point = wq.scale.view(-1, 1, 1, 1), wq.zero_point.view(-1, 1, 1, 1)
    low, high = (wq.quant_min - zero_point) * scale, (wq.quant_max - zero_point) * scale
    assert torch.allclose(wq(w), torch.clamp(w, low, high), atol=1e-5)
    assert wq.regularizer(beta=20.0).item() > 0


def test_hard_rounding_equals_reported_integer_weights() -> None:
    w = _weight()
    wq = WeightQuantizer(w.shape, bits=4, symmetric=False, per_channel=True)
    wq.calibrate(w, "minmax")
    wq.init_rounding(w)
    with torch.no_grad():
        wq.alpha.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    wq.finalize_rounding()
    codes = wq.integer_weight(w)
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    scale, zero_point = wq.scale.view(-1, 1, 1, 1), wq.zero_point.view(-1, 1, 1, 1)
    assert torch.equal(wq(w), (codes.float() - zero_point) * scale)
    # every code is the floor or the ceiling of w / s: rounding is learned, not arbitrary
    floor = torch.floor(w / scale) + zero_point
    assert torch.all((codes - floor).abs() <= 1)


def test_integer_weight_refused_while_soft() -> None:
    w = _weight()
    wq = WeightQuantizer(w.shape, bits=4, symmetric=True, per_channel=False)
    wq.calibrate(w, "minmax")
    wq.init_rounding(w)
    with pytest.raises(RuntimeError, match="finalize_rounding"):
        wq.integer_weight(w)


def test_weight_quantizer_rejects_nan() -> None:
    w = _weight()
    w[0, 0, 0, 0] = float("nan")
    wq = WeightQuantizer(w.shape, bits=4, symmetric=True, per_channel=True)
    with pytest.raises(ValueError, match="NaN"):
        wq.calibrate(w, "minmax")


def _observer(x: torch.Tensor) -> ActivationObserver:
    observer = ActivationObserver(generator=torch.Generator().manual_seed(0))
    for chunk in x.split(256):
        observer.update(chunk)
    return observer


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_activation_calibration_relu_output_uses_zero_point_zero(method: str) -> None:
    x = torch.relu(torch.randn(2048, 16, generator=torch.Generator().manual_seed(0)))
    aq = ActivationQuantizer(bits=4)
    aq.calibrate(_observer(x), method)
    assert aq.zero_point.item() == 0
    assert sqnr_db(x, aq(x)) > 15.0


def test_activation_calibration_signed_input_gets_zero_point() -> None:
    x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))
    aq = ActivationQuantizer(bits=8)
    aq.calibrate(_observer(x), "minmax")
    assert 100 < aq.zero_point.item() < 156
    assert sqnr_db(x, aq(x)) > 38.0


def test_percentile_clips_outliers() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    x[0] = 1000.0
    scales = {}
    for method in ("minmax", "percentile"):
        aq = ActivationQuantizer(bits=8)
        aq.calibrate(_observer(x), method)
        scales[method] = aq.scale.item()
    assert scales["percentile"] < scales["minmax"] / 50


def test_activation_quantizer_before_calibrate_and_bad_data() -> None:
    aq = ActivationQuantizer(bits=4)
    with pytest.raises(RuntimeError, match="before calibrate"):
        aq(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        ActivationObserver().update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(RuntimeError, match="no data"):
        aq.calibrate(ActivationObserver(), "minmax")


def test_lsq_step_size_gets_gradient_and_drop_keeps_float_elements() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    aq = ActivationQuantizer(bits=2)
    aq.calibrate(_observer(x), "minmax")
    aq.scale.requires_grad_(True)
    (aq(x) - x).pow(2).sum().backward()
    assert aq.scale.grad is not None and aq.scale.grad.abs().item() > 0
    aq.drop = QuantDrop(0.5, seed=0)
    with torch.no_grad():
        first, second = aq(x), aq(x)
    kept_float = (first == x).float().mean().item()
    assert 0.45 < kept_float < 0.55
    # a fresh mask at every call: about half the elements change state between two calls
    changed = ((first == x) != (second == x)).float().mean().item()
    assert 0.4 < changed < 0.6


def test_quant_drop_masks_follow_prob_and_seed() -> None:
    like = torch.zeros(8, 16, 5, 5)
    masks = [QuantDrop(0.3, seed=7).mask(like) for _ in range(2)]
    assert torch.equal(masks[0], masks[1])  # same seed, same first mask
    dropper = QuantDrop(0.3, seed=7)
    stacked = torch.stack([dropper.mask(like) for _ in range(50)])
    assert set(stacked.unique().tolist()) <= {0.0, 1.0}
    assert abs(stacked.mean().item() - 0.3) < 0.02
    # per element, keeping is close to independent across calls
    per_element = stacked.flatten(1).mean(0)
    assert per_element.std().item() < 0.1
    with pytest.raises(ValueError, match="drop probability"):
        QuantDrop(1.0, seed=0)
