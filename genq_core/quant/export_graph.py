"""Give a ``torch.export`` graph back the Conv2d / Linear / BatchNorm modules the quantizer works on.

``torch.export.load(path).module()`` returns an ``fx.GraphModule`` flattened to aten ops: every
convolution is a ``call_function`` of ``aten.conv2d`` whose weight is a ``get_attr`` node, and the
parameters hang off plain ``nn.Module`` holders named like the original model's modules.
:func:`genq_core.quant.prepare_model` only finds layers through ``nn.Conv2d`` / ``nn.Linear``
modules and BatchNorm pairs through ``nn.BatchNorm*d`` modules, so :func:`modules_from_export`
rewrites those op nodes into ``call_module`` nodes of real modules that hold the same tensors.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from genq_core.quant.prepare import UnsupportedModuleError

__all__ = ["modules_from_export"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_CONV_OPS = (_aten.conv2d.default, _aten.conv2d.padding, _aten.convolution.default)
_BN_OPS = (_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default)
_MATMUL_OPS = (_aten.addmm.default, _aten.mm.default)
_TRANSPOSE_OPS = (_aten.permute.default, _aten.t.default)


def modules_from_export(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of an exported graph with its conv, linear and BatchNorm ops turned into modules.

    Rewritten ops (each only when its weights are ``get_attr`` nodes that no other op reads):

    - ``aten.conv2d`` (both overloads) and non-transposed 2-D ``aten.convolution`` ->
      ``nn.Conv2d``;
    - ``aten.linear``, and ``addmm(bias, x, permute(weight))`` / ``mm(x, t(weight))`` of a
      decomposed graph -> ``nn.Linear``;
    - ``aten.batch_norm`` in inference mode and ``aten._native_batch_norm_legit_no_training``
      -> ``nn.BatchNorm1d/2d/3d`` (by the input's rank), so that ``prepare_model`` folds it.
      Batch norms in training mode stay ops (not folded).

    A new module takes the place of the holder its weight hung on (``layers.0.conv1``), so layer
    names, their registration order and ``state_dict`` keys stay those of the original model;
    when the holder also holds other tensors or modules, the layer gets a fresh name at the root
    (``blocks_0_conv2d_3``). Tensors the graph still reads directly (``layer_norm`` weights, a
    ViT's ``pos_embed``) stay in float: on a holder without children they become buffers, as
    ``prepare_model`` only accepts parameters on module types it knows.

    Args:
        gm: the module of an exported program, ``torch.export.load(path).module()``, with or
            without ``run_decompositions()``. Not modified.

    Returns:
        A plain ``fx.GraphModule`` in eval mode with the same outputs as ``gm``. The export's
        input guards (e.g. a static batch size) are kept.

    Raises:
        UnsupportedModuleError: a conv/linear weight computed in the graph (weight
            standardisation) or read by several ops (a layer called twice), or a matrix weight
            (``*weight*``, 2-D or more) left to an op the rewrite does not handle (conv1d,
            conv3d, transposed convs, batched matmuls); the message names it.
    """
    # 1. a plain GraphModule over copied tensors: eval() works and the caller's module is untouched
    work = copy.deepcopy(fx.GraphModule(gm, copy.deepcopy(gm.graph)))
    graph = work.graph

    # 2. rewrite the layer ops, in graph (execution) order
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CONV_OPS or node.target == _aten.linear.default:
            _rewrite_layer(work, node)
            rewritten += 1
        elif node.target in _MATMUL_OPS:
            rewritten += _rewrite_decomposed_linear(work, node)
        elif node.target in _BN_OPS:
            rewritten += _rewrite_batchnorm(work, node)

    # 3. what the graph still reads directly stays float; refuse matrix weights left behind
    _check_leftover_weights(work)
    _params_on_holders_to_buffers(work)
    graph.lint()
    work.recompile()
    logger.debug("rewrote %d aten ops of an exported graph into modules", rewritten)
    return work.eval()


def _rewrite_layer(work: fx.GraphModule, node: fx.Node) -> None:
    """Replace one conv/linear op by a ``call_module`` of ``nn.Conv2d`` / ``nn.Linear``."""
    args = _bind(node)
    weight_node, bias_node = args["weight"], args["bias"]
    for role, value in (("weight", weight_node), ("bias", bias_node)):
        if value is not None and not _is_exclusive_attr(value, node):
            raise UnsupportedModuleError(_not_a_layer_weight(node, role, value))
    weight = _fetch(work, weight_node)
    bias = _fetch(work, bias_node) if bias_node is not None else None

    layer: nn.Conv2d | nn.Linear
    if node.target == _aten.linear.default:
        if weight.dim() != 2:
            raise UnsupportedModuleError(f"op {node.name}: linear weight must be 2-D")
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        if node.target == _aten.convolution.default and (args["transposed"] or weight.dim() != 4):
            raise UnsupportedModuleError(
                f"op {node.name}: only non-transposed 2-D convolutions can be quantized"
            )
        groups = int(args["groups"])
        padding = args["padding"]
        layer = nn.Conv2d(
            weight.shape[1] * groups,
            weight.shape[0],
            kernel_size=(weight.shape[2], weight.shape[3]),
            stride=_pair(args["stride"]),
            padding=padding if isinstance(padding, str) else _pair(padding),
            dilation=_pair(args["dilation"]),
            groups=groups,
            bias=bias is not None,
        )
    _set_tensors(layer, weight, bias)
    tensors = {"weight": weight_node} | ({"bias": bias_node} if bias_node is not None else {})
    _install(work, node, layer, tensors, node.args[0])


def _rewrite_decomposed_linear(work: fx.GraphModule, node: fx.Node) -> int:
    """``addmm(bias, x, permute(weight))`` or ``mm(x, t(weight))`` -> ``nn.Linear``; 0 if not."""
    args = _bind(node)
    bias_node = args.get("self") if node.target == _aten.addmm.default else None
    mat2 = args["mat2"]
    if not (
        isinstance(mat2, fx.Node)
        and mat2.target in _TRANSPOSE_OPS
        and len(mat2.users) == 1
        and (mat2.target == _aten.t.default or _pair(mat2.args[1]) == (1, 0))
        and _is_exclusive_attr(mat2.args[0], mat2)
        and (bias_node is None or _is_exclusive_attr(bias_node, node))
        and float(args.get("beta", 1)) == 1.0
        and float(args.get("alpha", 1)) == 1.0
    ):
        return 0
    weight_node = mat2.args[0]
    assert isinstance(weight_node, fx.Node)
    weight = _fetch(work, weight_node)
    bias = _fetch(work, bias_node) if bias_node is not None else None
    if weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[:1]):
        return 0
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    _set_tensors(layer, weight, bias)
    inp = args["mat1"]
    node.replace_input_with(mat2, weight_node)  # the transpose goes, the weight stays an input
    work.graph.erase_node(mat2)
    tensors = {"weight": weight_node} | ({"bias": bias_node} if bias_node is not None else {})
    _install(work, node, layer, tensors, inp)
    return 1


def _rewrite_batchnorm(work: fx.GraphModule, node: fx.Node) -> int:
    """Replace an inference-mode batch-norm op by ``nn.BatchNorm*d``; 0 when left as it is."""
    args = _bind(node)
    outputs: list[fx.Node] = [node]
    if node.target == _aten._native_batch_norm_legit_no_training.default:
        # returns (out, save_mean, save_invstd); only the first may be used
        outputs = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in outputs):
            return 0
    elif args["training"]:
        return 0
    rank = _rank(args["input"])
    stats = (args["running_mean"], args["running_var"])
    affine = (args["weight"], args["bias"])
    if (
        rank not in _BATCHNORMS
        or not all(_is_exclusive_attr(n, node) for n in stats)
        or not (all(n is None for n in affine) or all(_is_exclusive_attr(n, node) for n in affine))
    ):
        return 0
    running_mean = _fetch(work, stats[0])
    bn = _BATCHNORMS[rank](
        running_mean.shape[0],
        eps=float(args["eps"]),
        momentum=float(args["momentum"]),
        affine=affine[0] is not None,
    )
    assert bn.running_mean is not None and bn.running_var is not None
    bn.running_mean.copy_(running_mean)
    bn.running_var.copy_(_fetch(work, stats[1]))
    tensors = {"running_mean": stats[0], "running_var": stats[1]}
    if affine[0] is not None and affine[1] is not None:
        bn.weight = _as_parameter(_fetch(work, affine[0]))
        bn.bias = _as_parameter(_fetch(work, affine[1]))
        tensors |= {"weight": affine[0], "bias": affine[1]}
    counter = _sibling_attr(work, stats[0], "num_batches_tracked")
    if counter is not None:
        assert bn.num_batches_tracked is not None
        bn.num_batches_tracked.copy_(_fetch(work, counter))
        tensors["num_batches_tracked"] = counter
    for output in outputs:
        if output is not node:
            # getitem(op, 0) of the tuple-returning op: the module's output replaces it
            node.meta = dict(output.meta)
            output.replace_all_uses_with(node)
            work.graph.erase_node(output)
    _install(work, node, bn, tensors, args["input"])
    return 1


_BATCHNORMS: dict[int, Callable[..., nn.modules.batchnorm._BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def _install(
    work: fx.GraphModule, node: fx.Node, module: nn.Module, tensors: dict[str, fx.Node], inp: Any
) -> None:
    """Call ``module`` on ``inp`` instead of ``node``; ``tensors`` (attr name in ``module`` ->
    ``get_attr`` node) lose their old home."""
    # 1. the holder of the tensors is reused when it holds exactly these tensors
    targets = {role: str(n.target) for role, n in tensors.items()}
    owners = {target.rpartition(".")[0] for target in targets.values()}
    owner = owners.pop() if len(owners) == 1 else ""
    reuse = owner != "" and _holds_exactly(work.get_submodule(owner), targets, owner)
    name = owner if reuse else _fresh_name(work, owner, node.name)
    if not reuse:
        work.add_submodule(name, module)

    # 2. the call_module node in place of the op, then the tensors' get_attr nodes go
    with work.graph.inserting_before(node):
        call = work.graph.call_module(name, (inp,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    work.graph.erase_node(node)
    for attr_node in tensors.values():
        if not attr_node.users:
            work.graph.erase_node(attr_node)
    if reuse:
        # in place of the holder: registration order (reconstruction's unit order) is kept
        work.set_submodule(owner, module)


def _holds_exactly(holder: nn.Module, targets: dict[str, str], owner: str) -> bool:
    """``holder`` has no children and no tensors but ``targets``, under their roles' names."""
    if any(True for _ in holder.children()):
        return False
    if any(target != f"{owner}.{role}" for role, target in targets.items()):
        return False
    own = {n for n, _ in holder.named_parameters(recurse=False)}
    own |= {n for n, _ in holder.named_buffers(recurse=False)}
    return own == set(targets)


def _fresh_name(work: fx.GraphModule, owner: str, op_name: str) -> str:
    base = f"{owner.replace('.', '_')}_{op_name}" if owner else op_name
    name, index = base, 1
    while hasattr(work, name):
        name, index = f"{base}_{index}", index + 1
    return name


def _bind(node: fx.Node) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound: dict[str, Any] = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


def _is_exclusive_attr(value: Any, user: fx.Node) -> bool:
    """A ``get_attr`` node of a tensor that only ``user`` reads."""
    return (
        isinstance(value, fx.Node)
        and value.op == "get_attr"
        and set(value.users) == {user}
        and user.args.count(value) + list(user.kwargs.values()).count(value) == 1
    )


def _not_a_layer_weight(node: fx.Node, role: str, value: Any) -> str:
    if isinstance(value, fx.Node) and value.op == "get_attr":
        users = sorted(u.name for u in value.users)
        return (
            f"op {node.name}: its {role} {value.target} is also read by {users}; layers called "
            "more than once per forward pass (shared weights) cannot be quantized"
        )
    return (
        f"op {node.name}: its {role} is computed in the graph ({value}), not a stored tensor "
        "(e.g. weight standardisation); such layers cannot be quantized"
    )


def _fetch(work: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    module_name, _, attr = str(node.target).rpartition(".")
    value = getattr(work.get_submodule(module_name), attr)
    assert isinstance(value, torch.Tensor)
    return value


def _sibling_attr(work: fx.GraphModule, node: fx.Node, attr: str) -> fx.Node | None:
    """The unused ``get_attr`` node of ``attr`` next to ``node``'s tensor (a BN's counter)."""
    target = f"{str(node.target).rpartition('.')[0]}.{attr}".lstrip(".")
    for candidate in work.graph.nodes:
        if candidate.op == "get_attr" and candidate.target == target and not candidate.users:
            return candidate
    return None


def _pair(value: Any) -> tuple[int, int]:
    """A 2-element int list/tuple (an op's stride, padding, ...) as a tuple."""
    items = list(value) if isinstance(value, list | tuple) else [value, value]
    return int(items[0]), int(items[1])


def _set_tensors(
    layer: nn.Conv2d | nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Give ``layer`` the graph's own tensors (made with the same shapes and bias flag)."""
    layer.weight = _as_parameter(weight)
    if bias is not None:
        layer.bias = _as_parameter(bias)


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    if isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)


def _rank(value: Any) -> int | None:
    meta = value.meta.get("val") if isinstance(value, fx.Node) else None
    return meta.dim() if isinstance(meta, torch.Tensor) else None


def _check_leftover_weights(work: fx.GraphModule) -> None:
    """Refuse matrix weights (``*weight*``, 2-D or more) still read by aten ops."""
    for node in work.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        value = _fetch(work, node)
        name = str(node.target).rpartition(".")[2]
        if "weight" in name and value.dim() >= 2 and value.is_floating_point():
            users = sorted(u.name for u in node.users)
            raise UnsupportedModuleError(
                f"cannot quantize {node.target} {tuple(value.shape)}, read by ops {users}: only "
                "conv2d and linear ops become quantized layers (conv1d/conv3d, transposed convs "
                "and batched matmuls are not supported)"
            )


def _params_on_holders_to_buffers(work: fx.GraphModule) -> None:
    """Parameters left on plain holders without children become buffers (they stay float)."""
    for _, module in work.named_modules():
        if type(module) is not nn.Module or any(True for _ in module.children()):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, param.detach())
