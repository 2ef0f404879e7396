"""Module surgery: swap ReLU for LeakyReLU, by module replacement or a ``torch.fx`` rewrite.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2), nn.ReLU())
    >>> swap_activations(model, names=["1"])
    ['1']
    >>> model[1]
    LeakyReLU(negative_slope=0.01, inplace=True)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SWAP_TARGETS = ("leaky_relu", "prelu")


def _is_ddp_wrapped(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def _replacement(
    module: nn.Module, to: str, negative_slope: float, device: torch.device
) -> nn.Module:
    if to == "leaky_relu":
        return nn.LeakyReLU(negative_slope, inplace=bool(getattr(module, "inplace", False)))
    return nn.PReLU(1, init=negative_slope).to(device)


def swap_activations(
    model: nn.Module,
    names: Iterable[str] | None = None,
    from_types: tuple[type[nn.Module], ...] = (nn.ReLU,),
    to: str = "leaky_relu",
    negative_slope: float = 0.01,
    wrapped: bool = False,
) -> list[str]:
    """Replace activation modules in place, anywhere in the module tree.

    Args:
        model: the model (not a DDP wrapper, see ``wrapped``).
        names: dotted names of the modules to replace; ``None`` replaces every
            module of ``from_types``.
        from_types: the activation types to replace.
        to: ``"leaky_relu"`` (no parameters, safe at any time) or ``"prelu"``
            (adds a learnable slope: refused once the model is wrapped for DDP,
            whose gradient reduction would never include it).
        negative_slope: the slope for negative inputs (PReLU's initial value).
        wrapped: whether the model is already wrapped for data-parallel training.

    Returns:
        The dotted names that were replaced, in module order. The ``inplace`` flag
        of each replaced module is kept.

    Raises:
        ValueError: on an unknown ``to``, a non-positive slope, a name that is not a
            module of ``from_types``, or ``to="prelu"`` on a wrapped model.
    """
    if to not in SWAP_TARGETS:
        raise ValueError(f"to={to!r} is not a swap target: use one of {list(SWAP_TARGETS)}.")
    if (
        isinstance(negative_slope, bool)
        or not isinstance(negative_slope, (int, float))
        or not 0 < negative_slope < 1
    ):
        raise ValueError(f"negative_slope={negative_slope!r} must be a number in (0, 1).")
    if to == "prelu" and (wrapped or _is_ddp_wrapped(model)):
        raise ValueError(
            "to='prelu' adds parameters, but the model is already wrapped for DDP: they would "
            "never be synchronized across ranks. Swap before wrapping (e.g. in configure_model "
            "or at setup), or use to='leaky_relu', which has no parameters."
        )
    modules = dict(model.named_modules())
    if names is None:
        targets = [n for n, m in modules.items() if n and isinstance(m, from_types)]
    else:
        targets = list(names)
        for name in targets:
            if name not in modules or not isinstance(modules[name], from_types):
                found = type(modules[name]).__name__ if name in modules else "no such module"
                raise ValueError(
                    f"names contains {name!r}, which is not one of "
                    f"{[t.__name__ for t in from_types]} ({found})."
                )
    device = next(model.parameters(), torch.empty(0)).device
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _replacement(modules[name], to, float(negative_slope), device))
    _sync_fast_path_flag(model)  # a swapped TransformerEncoderLayer activation is used in eval too
    if not targets:
        warnings.warn(
            f"swap_activations: no {[t.__name__ for t in from_types]} module found in "
            f"{type(model).__name__}; if its forward calls F.relu / torch.relu, use "
            "swap_functional_relu (a torch.fx rewrite) instead.",
            UserWarning,
            stacklevel=2,
        )
    return targets


_FUNCTIONAL_RELUS = {F.relu, torch.relu, torch.relu_, F.relu_}
_METHOD_RELUS = {"relu", "relu_"}
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_TRANSFORMER_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def _sync_fast_path_flag(model: nn.Module) -> None:
    """Keep ``TransformerEncoderLayer``'s fast-path flag true to its ``activation``.

    The inference fast path computes ReLU or GELU in one fused kernel when
    ``activation_relu_or_gelu`` is 1 or 2, whatever ``activation`` now is; 0 makes
    every pass call ``activation``.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            activation = module.activation
            if activation is F.relu or type(activation) is nn.ReLU:
                module.activation_relu_or_gelu = 1
            elif activation is F.gelu or type(activation) is nn.GELU:
                module.activation_relu_or_gelu = 2
            else:
                module.activation_relu_or_gelu = 0


def _swap_transformer_relus(model: nn.Module, negative_slope: float) -> list[str]:
    """Give every Transformer layer whose ``activation`` is ``F.relu`` a LeakyReLU module."""
    swapped = []
    for name, module in model.named_modules():
        if isinstance(module, _TRANSFORMER_LAYERS) and module.activation in _FUNCTIONAL_RELUS:
            module.activation = nn.LeakyReLU(negative_slope)
            swapped.append(name)
    _sync_fast_path_flag(model)
    return swapped


class _TransformerLeafTracer(torch.fx.Tracer):
    """Traces around ``nn.Transformer*`` modules (their ReLUs are swapped in place)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*_TRANSFORMER_LAYERS, *_TRANSFORMER_STACKS)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def swap_functional_relu(module: nn.Module, negative_slope: float = 0.01) -> nn.Module:
    """Rewrite ``F.relu`` / ``torch.relu`` / ``x.relu()`` calls in ``forward`` to leaky ReLU.

    Module replacement cannot reach activations that ``forward`` calls as
    functions. This traces ``module`` with ``torch.fx`` and returns a new
    ``GraphModule`` (sharing the parameters) whose ReLU calls are
    ``F.leaky_relu(x, negative_slope)``. Put it where the module was.

    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (default
    activation ``F.relu``) cannot be traced (their ``forward`` branches on the
    input); they are changed in place instead: ``activation`` becomes an
    ``nn.LeakyReLU(negative_slope)`` module and the encoder layer's inference fast
    path, which would compute a ReLU whatever ``activation`` is, is turned off
    (``activation_relu_or_gelu = 0``). The tracer treats them (and
    ``nn.TransformerEncoder``/``Decoder``/``Transformer``) as leaves; a module that is
    one of them is returned itself, changed in place.

    Raises:
        ValueError: when ``module`` cannot be traced, with the tracer's reason
            (data-dependent control flow, for instance) and what to do instead.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return torch.relu(self.fc(x))
        >>> net = Net()
        >>> rewritten = swap_functional_relu(net, negative_slope=0.1)
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(rewritten(x), F.leaky_relu(net.fc(x), 0.1))
        True
        >>> layer = swap_functional_relu(nn.TransformerEncoderLayer(8, 2), 0.1)
        >>> layer.activation, layer.activation_relu_or_gelu
        (LeakyReLU(negative_slope=0.1), 0)
    """
    transformer_layers = _swap_transformer_relus(module, float(negative_slope))
    if isinstance(module, (*_TRANSFORMER_LAYERS, *_TRANSFORMER_STACKS)):
        if not transformer_layers:
            warnings.warn(
                f"swap_functional_relu: no F.relu activation in {type(module).__name__}.",
                UserWarning,
                stacklevel=2,
            )
        return module
    try:
        graph = _TransformerLeafTracer().trace(module)
    except Exception as error:  # torch.fx raises many types
        raise ValueError(
            f"swap_functional_relu: {type(module).__name__} cannot be traced by torch.fx "
            f"({type(error).__name__}: {error}). Replace its F.relu / torch.relu calls by "
            "nn.ReLU modules so swap_activations can replace them, or rewrite the "
            "traceable submodules one by one."
        ) from error
    graph_module = torch.fx.GraphModule(module, graph, type(module).__name__)
    replaced = len(transformer_layers)
    for node in list(graph_module.graph.nodes):
        is_function = node.op == "call_function" and node.target in _FUNCTIONAL_RELUS
        is_method = node.op == "call_method" and node.target in _METHOD_RELUS
        if not (is_function or is_method):
            continue
        inplace = node.target in (torch.relu_, F.relu_, "relu_") or bool(node.kwargs.get("inplace"))
        with graph_module.graph.inserting_after(node):
            leaky = graph_module.graph.call_function(
                F.leaky_relu, (node.args[0], float(negative_slope), inplace)
            )
        node.replace_all_uses_with(leaky)
        graph_module.graph.erase_node(node)
        replaced += 1
    if not replaced:
        warnings.warn(
            f"swap_functional_relu: no F.relu / torch.relu call found in {type(module).__name__}.",
            UserWarning,
            stacklevel=2,
        )
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module


def activation_types(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The class names of the modules at ``names`` (to compare models across ranks)."""
    modules = dict(model.named_modules())
    return [type(modules[n]).__name__ if n in modules else "missing" for n in names]


__all__ = ["activation_types", "swap_activations", "swap_functional_relu"]
