from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx, nn

from genq_core.quant import (
    QuantConfig,
    ReconstructionConfig,
    UnsupportedModuleError,
    quantize_model,
)
from genq_core.quant.export_graph import modules_from_export

_LAYER_OPS = {
    torch.ops.aten.conv2d.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten.linear.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
}


def _export(
    model: nn.Module, example: torch.Tensor, folder: Path, dynamic: bool = True
) -> torch.export.ExportedProgram:
    """Export, save and load back a ``.pt2`` archive, as a user's file would arrive."""
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    path = folder / "model.pt2"
    torch.export.save(program, path)
    return torch.export.load(path)


def _sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    noise = (reference - test).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


@pytest.fixture
def eager(tiny_resnet: nn.Module) -> nn.Module:
    """conftest's TinyResNet: residual blocks, depthwise convs, BatchNorms, a linear head."""
    return tiny_resnet


@pytest.fixture
def program(eager: nn.Module, tmp_path: Path) -> torch.export.ExportedProgram:
    return _export(eager, torch.randn(2, 3, 16, 16), tmp_path)


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _call_function_targets(gm: fx.GraphModule) -> set[object]:
    return {node.target for node in gm.graph.nodes if node.op == "call_function"}


def test_layers_become_modules_with_the_original_names(
    eager: nn.Module, program: torch.export.ExportedProgram, batch: torch.Tensor
) -> None:
    original = program.module()
    gm = modules_from_export(original)

    assert not _call_function_targets(gm) & _LAYER_OPS
    eager_types = {name: type(m) for name, m in eager.named_modules()}
    for name, module in gm.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear | nn.BatchNorm2d):
            assert eager_types[name] is type(module), name
    assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == 6
    assert sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules()) == 6
    assert list(gm.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(gm(batch), eager(batch))
    # the caller's module still holds the aten ops
    assert torch.ops.aten.conv2d.default in _call_function_targets(original)
    assert not gm.training


def test_quantized_export_matches_quantized_eager_model(
    eager: nn.Module, program: torch.export.ExportedProgram, batch: torch.Tensor
) -> None:
    gm = modules_from_export(program.module())
    config = QuantConfig(weight_bits=4, act_bits=4, preset="minmax")
    q_eager = quantize_model(eager, config, batch)
    q_export = quantize_model(gm, config, batch)

    assert q_export.layer_order == q_eager.layer_order
    assert q_export.folded_batchnorms == q_eager.folded_batchnorms
    torch.testing.assert_close(q_export(batch), q_eager(batch), atol=1e-5, rtol=1e-4)


def test_w8a8_minmax_of_export_agrees_with_float(
    eager: nn.Module, program: torch.export.ExportedProgram, batch: torch.Tensor
) -> None:
    gm = modules_from_export(program.module())
    config = QuantConfig(weight_bits=8, act_bits=8, preset="minmax", first_last_bits=None)
    qmodel = quantize_model(gm, config, batch)
    with torch.no_grad():
        reference, quantized = eager(batch), qmodel(batch)
    assert _sqnr_db(reference, quantized) > 25.0
    assert (reference.argmax(1) == quantized.argmax(1)).float().mean() >= 0.9


def test_reconstruction_runs_on_an_exported_model(
    program: torch.export.ExportedProgram, batch: torch.Tensor
) -> None:
    gm = modules_from_export(program.module())
    config = QuantConfig(
        weight_bits=4,
        act_bits=4,
        preset="qdrop",
        reconstruction=ReconstructionConfig(iters=2, batch_size=8),
    )
    qmodel = quantize_model(gm, config, batch[:16])
    assert torch.isfinite(qmodel(batch)).all()
    assert len(list(qmodel.quant_layers())) == 7


def test_decomposed_graph_is_rewritten_too(
    eager: nn.Module, program: torch.export.ExportedProgram, batch: torch.Tensor
) -> None:
    gm = modules_from_export(program.run_decompositions().module())
    assert not _call_function_targets(gm) & _LAYER_OPS
    assert isinstance(gm.get_submodule("fc"), nn.Linear)
    assert isinstance(gm.get_submodule("layers.1.shortcut.1"), nn.BatchNorm2d)
    torch.testing.assert_close(gm(batch), eager(batch))


def test_static_batch_guard_is_kept(eager: nn.Module, tmp_path: Path) -> None:
    static = _export(eager, torch.randn(2, 3, 16, 16), tmp_path, dynamic=False)
    gm = modules_from_export(static.module())
    assert gm(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(AssertionError, match="Guard failed"):
        gm(torch.randn(3, 3, 16, 16))


class _NormMlp(nn.Module):
    """LayerNorm and a free parameter: tensors that stay float ops after the rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding="same")
        self.offset = nn.Parameter(torch.randn(8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x).mean((2, 3)) + self.offset
        return self.head(self.norm(features))


def test_tensors_left_to_ops_stay_float_and_quantization_works(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    torch.manual_seed(0)
    model = _NormMlp().eval()
    gm = modules_from_export(_export(model, batch[:2], tmp_path).module())

    assert isinstance(gm.get_submodule("stem"), nn.Conv2d)
    assert gm.get_submodule("stem").padding == "same"
    norm = gm.get_submodule("norm")
    assert type(norm) is nn.Module and dict(norm.named_buffers()).keys() == {"weight", "bias"}
    torch.testing.assert_close(gm(batch), model(batch))
    qmodel = quantize_model(gm, QuantConfig(weight_bits=8, act_bits=8, preset="minmax"), batch)
    assert _sqnr_db(model(batch).detach(), qmodel(batch)) > 25.0


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x)).mean((2, 3))


class _Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.flatten(2)).mean(2)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_SharedConv(), "called more than once"),
        (_Conv1dNet(), "only conv2d and linear ops"),
    ],
)
def test_layers_that_cannot_be_quantized_are_named(
    model: nn.Module, message: str, tmp_path: Path
) -> None:
    exported = _export(model.eval(), torch.randn(2, 3, 8, 8), tmp_path)
    with pytest.raises(UnsupportedModuleError, match=message) as info:
        modules_from_export(exported.module())
    assert "conv" in str(info.value)
