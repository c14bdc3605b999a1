"""Built-in architectures, resolved by name or by "package.module:factory".

Every model takes inputs of shape (batch, *input_shape) and returns logits. Layers are
named so that a carrier can be picked by name: "fc2" is that module's output, "head:input"
is what flows into the module "head" (the default carrier is the input of the last linear
layer, the paper's second-to-last layer).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import CheckpointError, InputError

__all__ = [
    "ZOO",
    "build_model",
    "layer_names",
    "default_layer",
    "capture",
    "layer_width",
    "activations",
]


class MLP(nn.Module):
    """The paper's MNIST MLP (784-512-512-10), sized to the input."""

    def __init__(self, input_shape, num_classes, hidden=(512, 512)):
        super().__init__()
        self.flat = nn.Flatten()
        width = math.prod(input_shape)
        layers = []
        for i, h in enumerate(hidden, start=1):
            setattr(self, f"fc{i}", nn.Linear(width, h))
            setattr(self, f"act{i}", nn.ReLU())
            layers.append(i)
            width = h
        self._depth = len(layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.flat(x)
        for i in range(1, self._depth + 1):
            x = getattr(self, f"act{i}")(getattr(self, f"fc{i}")(x))
        return self.head(x)


class CNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, one hidden dense layer."""

    def __init__(self, input_shape, num_classes, channels=(32, 64), hidden=128):
        super().__init__()
        c, h, w = _image_shape(input_shape)
        self.conv1 = nn.Conv2d(c, channels[0], 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(channels[1] * (h // 2) * (w // 2), hidden)
        self.act3 = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.head(self.act3(self.fc1(self.flat(x))))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.act2 = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(y + self.short(x))


class ResNet(nn.Module):
    """A small residual network: a stem and three basic blocks, global average pooling."""

    def __init__(self, input_shape, num_classes, widths=(16, 32, 64)):
        super().__init__()
        c, _, _ = _image_shape(input_shape)
        self.stem = nn.Conv2d(c, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.act = nn.ReLU()
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.act(self.bn(self.stem(x))))
        return self.head(self.flat(self.pool(x)))


def _image_shape(input_shape) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise InputError(
            f"this architecture needs image inputs (channels, height, width), got "
            f"{list(input_shape)}: use --arch mlp for flat features"
        )
    return tuple(int(d) for d in input_shape)


ZOO: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN, "resnet": ResNet}


def _resolve_factory(arch: str) -> tuple[Callable[..., nn.Module], bool]:
    if arch in ZOO:
        return ZOO[arch], True
    if ":" not in arch:
        raise InputError(
            f"unknown architecture '{arch}': use one of {', '.join(ZOO)} or package.module:factory"
        )
    module_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, SyntaxError) as exc:  # SyntaxError: the user's module
        raise InputError(
            f"cannot load architecture '{arch}' ({exc}): check that the module is importable "
            "(on PYTHONPATH) and defines that factory"
        ) from None
    return factory, False


def build_model(
    arch: str, arch_kwargs: dict, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """Instantiate an architecture. User factories get input_shape/num_classes if they accept them."""
    factory, builtin = _resolve_factory(arch)
    kwargs = dict(arch_kwargs)
    params = inspect.signature(factory).parameters
    for name, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if builtin or name in params:
            kwargs.setdefault(name, value)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise InputError(f"cannot build '{arch}' with {arch_kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"factory '{arch}' returned {type(model).__name__}, not a torch module")
    return model


def layer_names(model: nn.Module) -> list[str]:
    """Every layer a carrier can sit on: each named module's output, and each linear input."""
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Linear):
            names.append(f"{name}:input")
        names.append(name)
    return names


def default_layer(model: nn.Module) -> str:
    """The input of the last linear layer (the paper's "second-to-last layer")."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise InputError("the model has no linear layer: choose a carrier with --layer")
    return f"{last}:input"


def _module(model: nn.Module, layer: str) -> tuple[nn.Module, bool]:
    name, _, point = layer.partition(":")
    modules = dict(model.named_modules())
    if not name or name not in modules or point not in ("", "input"):
        raise InputError(
            f"no layer '{layer}' in this model: choose --layer from {', '.join(layer_names(model))}"
        )
    return modules[name], point == "input"


@contextmanager
def capture(model: nn.Module, layer: str) -> Iterator[dict[str, torch.Tensor]]:
    """Record the activation at `layer` (flattened to (batch, M)) on every forward pass."""
    module, at_input = _module(model, layer)
    store: dict[str, torch.Tensor] = {}

    def keep(t):
        store["act"] = t.flatten(1)

    if at_input:
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: keep(out))
    try:
        yield store
    finally:
        handle.remove()


def layer_width(model: nn.Module, layer: str, input_shape: tuple[int, ...]) -> int:
    """M: the number of features at `layer` for one sample."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), capture(model, layer) as store:
            model(torch.zeros(1, *input_shape, device=device))
    except RuntimeError as exc:
        raise CheckpointError(f"the model cannot run on inputs of shape {list(input_shape)}: {exc}") from None
    finally:
        model.train(was_training)
    return int(store["act"].shape[1])


@torch.no_grad()
def activations(model: nn.Module, layer: str, x, batch_size: int = 1024) -> torch.Tensor:
    """The activation at `layer` for every sample of x (numpy or tensor), as a CPU (n, M) tensor."""
    model.eval()
    device = next(model.parameters()).device
    outs = []
    with capture(model, layer) as store:
        for i in range(0, len(x), batch_size):
            model(torch.as_tensor(x[i : i + batch_size], dtype=torch.float32, device=device))
            outs.append(store["act"].float().cpu())
    return torch.cat(outs)
