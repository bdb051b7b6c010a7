from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from genq_core.quant import QuantConfig, UnsupportedModuleError, prepare_model
from genq_core.quant.modules import QuantAttention, QuantConv2d, QuantInput, QuantLinear


def _float_outputs(qmodel: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    qmodel.set_quant_state(weights=False, activations=False)  # type: ignore[operator]
    return qmodel(x)


def test_batchnorm_folding_preserves_outputs(tiny_resnet: nn.Module, images: torch.Tensor) -> None:
    qmodel = prepare_model(tiny_resnet, QuantConfig(), images[:4])
    assert len(qmodel.folded_batchnorms) == 6  # stem, 2 per block, 1 shortcut
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    with torch.no_grad():
        torch.testing.assert_close(
            _float_outputs(qmodel, images), tiny_resnet(images), rtol=1e-4, atol=1e-5
        )


def test_linear_batchnorm1d_folded_and_unpaired_batchnorm_kept() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm1d(8),  # before any layer: stays in float
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )
    model[2].running_mean.uniform_(-1, 1)  # type: ignore[operator]
    model.eval()
    x = torch.randn(32, 8)
    qmodel = prepare_model(model, QuantConfig(), x)
    assert qmodel.folded_batchnorms == [("1", "2")]
    assert isinstance(qmodel.model.get_submodule("0"), nn.BatchNorm1d)
    with torch.no_grad():
        torch.testing.assert_close(_float_outputs(qmodel, x), model(x), rtol=1e-4, atol=1e-5)


def test_callers_model_is_not_mutated(tiny_resnet: nn.Module, images: torch.Tensor) -> None:
    tiny_resnet.train()
    before = copy.deepcopy(tiny_resnet.state_dict())
    types_before = [type(m) for m in tiny_resnet.modules()]
    prepare_model(tiny_resnet, QuantConfig(), images[:4])
    assert tiny_resnet.training
    assert [type(m) for m in tiny_resnet.modules()] == types_before
    after = tiny_resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_first_and_last_layers_get_first_last_bits(
    tiny_resnet: nn.Module, images: torch.Tensor
) -> None:
    qmodel = prepare_model(tiny_resnet, QuantConfig(weight_bits=2, act_bits=3), images[:2])
    layers = list(qmodel.quant_layers())
    assert next(name for name, _ in layers) == "stem" and layers[-1][0] == "fc"
    bits = [(layer.weight_quantizer.bits, layer.input_quantizer.bits) for _, layer in layers]
    assert bits[0] == bits[-1] == (8, 8)
    assert all(b == (2, 3) for b in bits[1:-1])
    same = prepare_model(tiny_resnet, QuantConfig(weight_bits=2, first_last_bits=None), images[:2])
    assert next(same.quant_layers())[1].weight_quantizer.bits == 2


def test_depthwise_conv_is_quantized_per_channel(
    tiny_resnet: nn.Module, images: torch.Tensor
) -> None:
    qmodel = prepare_model(tiny_resnet, QuantConfig(), images[:2])
    depthwise = qmodel.model.get_submodule("layers.0.conv2")
    assert isinstance(depthwise, QuantConv2d) and depthwise.conv.groups == 8
    assert depthwise.weight_quantizer.scale.shape == (8,)


def test_vit_attention_and_blocks_are_quantized(tiny_vit: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    qmodel = prepare_model(tiny_vit, QuantConfig(), x)
    kinds = [type(m) for m in qmodel.modules()]
    assert kinds.count(QuantAttention) == 2 and kinds.count(QuantInput) == 0
    assert kinds.count(QuantLinear) == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block; head
    names = [name for name, _ in qmodel.quant_layers()]
    assert names[0] == "patch_embed.proj" and names[-1] == "head"
    with torch.no_grad():
        torch.testing.assert_close(_float_outputs(qmodel, x), tiny_vit(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("module", "kind"),
    [
        (nn.Conv1d(4, 4, 1), "Conv1d"),
        (nn.MultiheadAttention(4, 1, batch_first=True), "MultiheadAttention"),
    ],
)
def test_unsupported_module_named(module: nn.Module, kind: str) -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.odd = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    with pytest.raises(UnsupportedModuleError, match=f"'odd.*{kind}"):
        prepare_model(Model(), QuantConfig(), torch.randn(2, 4))


def test_model_without_layers_or_failing_forward() -> None:
    with pytest.raises(UnsupportedModuleError, match="no Conv2d or Linear"):
        prepare_model(nn.Sequential(nn.ReLU()), QuantConfig(), torch.randn(2, 4))
    with pytest.raises(ValueError, match="failed on the example input"):
        prepare_model(nn.Linear(4, 2), QuantConfig(), torch.randn(2, 5))


def test_shared_layer_refused() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    with pytest.raises(UnsupportedModuleError, match="more than once.*fc"):
        prepare_model(Shared(), QuantConfig(), torch.randn(2, 4))


def test_vit_block_inputs_quantized_on_request(tiny_vit: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    qmodel = prepare_model(tiny_vit, QuantConfig(quantize_block_inputs=True), x)
    wrapped = [name for name, m in qmodel.model.named_modules() if isinstance(m, QuantInput)]
    assert wrapped == ["blocks.0", "blocks.1"]
    assert [name for name, _ in qmodel.quant_layers()][1] == "blocks.0.module.attn.qkv"


def test_timm_batchnorm_act_is_folded_and_keeps_its_activation() -> None:
    model = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=3).eval()
    with torch.no_grad():  # non-trivial running statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    qmodel = prepare_model(model, QuantConfig(), x)
    qmodel.set_quant_state(weights=False, activations=False)
    left = [m for m in qmodel.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert left == []
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-4, atol=1e-4)
