"""Hidden-unit permutation and positive rescaling: other weights, exactly the same function.

A set of hidden units sits between a producing layer (Linear, or Conv with groups=1) and a
consuming one, joined only by operations that act on each unit alone and commute with a
positive scale: ReLU and LeakyReLU (positively homogeneous), max and average pooling (per
channel), dropout, identity, and one Flatten (a conv's channels flattened into a Linear's
input columns, each channel a contiguous block). Shuffling the units (the producer's output
rows and biases, the consumer's input columns or channel blocks) and multiplying unit k by
c_k > 0 on the way in and 1/c_k on the way out leaves every output unchanged. The pairs are
found in the model's torch.fx graph, so the zoo's MLP and CNN and any user model of that
shape qualify; BatchNorm, residual additions, shared layers or a unit read elsewhere
break a pair (the zoo's ResNet has none left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError, one_line
from .base import Attack

__all__ = ["PermuteAttack", "ATTACK", "find_unit_sets"]

# each acts on every unit (feature or channel) alone and f(c x) = c f(x) for c > 0
_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                        nn.Dropout3d)
_ELEMENTWISE_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.dropout)
_ELEMENTWISE_METHODS = ("relu",)
# per-channel spatial pooling: only after a conv, whose channels are dimension 1
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH = 1024  # rows per forward pass of the function check


@dataclass(frozen=True)
class UnitSet:
    """The hidden units between `producer` and `consumer` (module names)."""

    producer: str
    consumer: str
    units: int
    flattened: bool  # the consumer is a Linear reading the producer's channels through a Flatten


def _is_flatten(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten of everything but the batch dimension."""
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        args = list(node.args[1:])
        start = node.kwargs.get("start_dim", args[0] if args else 0)
        end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return start == 1 and end == -1
    return False


def _kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """"unit" (elementwise), "pool", "flatten", or None for anything else."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, _ELEMENTWISE_MODULES):
            return "unit"
        if isinstance(module, _POOL_MODULES):
            return "pool"
    elif node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return "unit"
        if node.target in _POOL_FUNCTIONS:
            return "pool"
    elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return "unit"
    return "flatten" if _is_flatten(node, modules) else None


def _layer(node: torch.fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> nn.Module | None:
    """The Linear or plain Conv this node calls, if it is called only here."""
    if node.op != "call_module" or calls.get(node.target, 0) != 1:
        return None
    module = modules[node.target]
    if isinstance(module, nn.Linear) or (isinstance(module, _CONV) and module.groups == 1):
        return module
    return None


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    # what tracing a user's forward can raise: data-dependent control flow, untraceable calls
    except (torch.fx.proxy.TraceError, TypeError, ValueError, RuntimeError, NotImplementedError,
            AttributeError) as exc:
        raise InputError(
            f"permute cannot follow this model's forward pass ({type(exc).__name__}): it needs a "
            "model that torch.fx can trace, made of Linear or Conv layers with ReLUs between them"
        ) from None


def tied_layers(model: nn.Module) -> set[str]:
    """The layers whose tensors another layer shares (tied weights): shuffling the units of one
    would shuffle the other's too, so their units are left alone."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):  # (a layer under two names too)
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            owners.setdefault(id(tensor), set()).add(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def find_unit_sets(model: nn.Module) -> list[UnitSet]:
    """Every set of hidden units that can be shuffled and positively rescaled, in graph order."""
    graph = _trace(model).graph
    modules = dict(model.named_modules())
    tied = tied_layers(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    sets = []
    for node in graph.nodes:
        producer = _layer(node, modules, calls)
        if producer is None:
            continue
        conv = isinstance(producer, _CONV)
        flattened, current = False, node
        while True:
            users = list(current.users)
            if len(users) != 1:
                break  # the units are read elsewhere too (a residual, a carrier, an output)
            nxt = users[0]
            consumer = _layer(nxt, modules, calls)
            if consumer is not None:
                fits = (isinstance(consumer, nn.Linear) and (flattened or not conv)) or \
                    (isinstance(consumer, _CONV) and conv and not flattened)
                if fits and list(nxt.all_input_nodes) == [current] and len(nxt.args) == 1 and not nxt.kwargs:
                    units = producer.out_channels if conv else producer.out_features
                    width = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
                    if width % units == 0 and (flattened or width == units) and not {node.target, nxt.target} & tied:
                        sets.append(UnitSet(node.target, nxt.target, units, flattened))
                break
            kind = _kind(nxt, modules)
            if kind is None or list(nxt.all_input_nodes) != [current]:
                break
            if kind == "pool" and (not conv or flattened):
                break  # pooling a Linear's features, or a flattened vector, mixes units
            if kind == "flatten":
                if not conv or flattened:
                    break
                flattened = True
            current = nxt
    return sets


@torch.no_grad()
def _logits(model: nn.Module, x) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    outs = [model(torch.as_tensor(x[i : i + _BATCH], dtype=torch.float32, device=device)).float().cpu()
            for i in range(0, len(x), _BATCH)]
    return torch.cat(outs)


@torch.no_grad()
def _apply(model: nn.Module, unit_set: UnitSet, perm: torch.Tensor, scale: torch.Tensor | None) -> None:
    """New unit j is old unit perm[j], multiplied by scale[j] (None: not rescaled)."""
    producer = model.get_submodule(unit_set.producer)
    consumer = model.get_submodule(unit_set.consumer)
    weight = producer.weight
    shape = (-1,) + (1,) * (weight.dim() - 1)
    new = weight[perm.to(weight.device)]
    if scale is not None:
        new = new * scale.to(weight).view(shape)
    weight.copy_(new)
    if producer.bias is not None:
        bias = producer.bias[perm.to(weight.device)]
        producer.bias.copy_(bias if scale is None else bias * scale.to(bias))
    weight = consumer.weight  # (out, in, *kernel) or (out, in)
    out, width = weight.shape[0], weight.shape[1]
    blocks = weight.reshape(out, unit_set.units, width // unit_set.units, *weight.shape[2:])
    new = blocks[:, perm.to(weight.device)]
    if scale is not None:
        new = new / scale.to(weight).view((1, -1) + (1,) * (new.dim() - 2))
    weight.copy_(new.reshape(weight.shape))


class PermuteAttack(Attack):
    """`units_permuted`: per producing layer, how many of its units moved to another place."""

    name = "permute"

    def run(self, model, ctx):
        scale = float(ctx.option("scale", 4.0))
        sets = find_unit_sets(model)
        if not sets:
            tied = sorted(tied_layers(model))
            raise InputError(
                "permute finds no hidden units to shuffle in this model: it needs Linear or Conv "
                "layers joined by ReLUs (and pooling or Flatten), without BatchNorm or residual "
                "connections between them" + (f", whose tensors no other layer shares (tied here: "
                                              f"{one_line(', '.join(tied), 100)})" if tied else "")
            )
        before = _logits(model, ctx.data.x_test)
        moved = {}
        for unit_set in sets:
            perm = torch.from_numpy(ctx.rng.permutation(unit_set.units))
            factors = None
            if scale > 1.0:
                draws = ctx.rng.uniform(-math.log(scale), math.log(scale), unit_set.units)
                factors = torch.from_numpy(draws).exp().float()
            _apply(model, unit_set, perm, factors)
            moved[unit_set.producer] = int((perm != torch.arange(unit_set.units)).sum())
        after = _logits(model, ctx.data.x_test)
        diff = float((after - before).abs().max()) if len(before) else 0.0
        spread = float(before.abs().max()) if len(before) else 0.0
        if not diff <= 1e-3 * spread:  # NaN included
            raise RuntimeError(f"permute changed the model's function: logits moved by {diff:.3g} "
                               f"(their scale {spread:.3g})")
        return model, {"scale": scale, "units_permuted": moved, "max_output_diff": diff}


ATTACK = PermuteAttack
