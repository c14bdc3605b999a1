"""Built-in architectures, resolved by name or by "package.module:factory".

Every model takes inputs of shape (batch, *input_shape) and returns logits. Layers are
named so that a carrier can be picked by name: "fc2" is that module's output, "head:input"
is what flows into the module "head" (the default carrier is the input of the last linear
layer, the paper's second-to-last layer).
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .data import MAX_CLASSES, MAX_INPUT_DIMS, MAX_INPUT_SIZE
from .errors import (
    USER_CODE_FAILURES,
    CheckpointError,
    InputError,
    SchemeError,
    load_factory,
    one_line,
    shown,
    user_failure,
)
from .fileio import back_to, current_folder, folder_kept

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

# Limits on what a model file, a data set or the command line may ask for. A file is data: it
# must never make us allocate gigabytes (a hidden size of 10**12) or build an empty layer.
MAX_PARAMETERS = 2**28  # 1 GiB of float32 weights
_MAX_WIDTH = 2**20
# package.module:factory, both parts Python names (no empty or relative module)
_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def is_factory_name(arch: str) -> bool:
    """Whether `arch` is spelt package.module:factory (it says nothing about importing it)."""
    return isinstance(arch, str) and len(arch) <= 200 and _FACTORY.fullmatch(arch) is not None


def shape_problem(input_shape, num_classes) -> str | None:
    """Why an input shape and a class count cannot describe a model of ours, or None."""
    if (not isinstance(input_shape, (list, tuple)) or not 1 <= len(input_shape) <= MAX_INPUT_DIMS
            or not all(type(d) is int and d >= 1 for d in input_shape)):
        return (f"the input shape must be 1 to {MAX_INPUT_DIMS} positive integers, "
                f"got {_brief(input_shape)}")
    if math.prod(input_shape) > MAX_INPUT_SIZE:
        return (f"the input shape {list(input_shape)} has {math.prod(input_shape)} features, more "
                f"than {MAX_INPUT_SIZE}")
    if type(num_classes) is not int or not 2 <= num_classes <= MAX_CLASSES:
        return f"the class count must be an integer from 2 to {MAX_CLASSES}, got {_brief(num_classes)}"
    return None


def _brief(value, limit: int = 80) -> str:
    """A value of unknown type, shown short and on one line (it may come from a hostile file)."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return one_line(text, limit)


def _widths(value, name: str, lo: int, hi: int) -> str | None:
    if not isinstance(value, (list, tuple)) or not lo <= len(value) <= hi:
        count = f"{lo}" if lo == hi else f"{lo} to {hi}"
        return f"'{name}' must be a list of {count} layer widths, got {_brief(value)}"
    for v in value:
        if type(v) is not int or not 1 <= v <= _MAX_WIDTH:
            return f"'{name}' widths must be integers from 1 to {_MAX_WIDTH}, got {_brief(v)}"
    return None


def _width(value, name: str) -> str | None:
    if type(value) is not int or not 1 <= value <= _MAX_WIDTH:
        return f"'{name}' must be an integer from 1 to {_MAX_WIDTH}, got {_brief(value)}"
    return None


# the keyword arguments each built-in architecture accepts, each with its check
_BUILTIN_KWARGS: dict[str, dict[str, Callable[[object], str | None]]] = {
    "mlp": {"hidden": lambda v: _widths(v, "hidden", 0, 16)},
    "cnn": {"channels": lambda v: _widths(v, "channels", 2, 2), "hidden": lambda v: _width(v, "hidden")},
    "resnet": {"widths": lambda v: _widths(v, "widths", 1, 8)},
}


def _builtin_problem(arch: str, kwargs: dict, input_shape: tuple[int, ...]) -> str | None:
    """Why a built-in architecture cannot take these arguments and this input, or None."""
    allowed = _BUILTIN_KWARGS[arch]
    for key, value in kwargs.items():
        if key not in allowed:
            names = ", ".join(allowed) or "none"
            return f"'{arch}' takes no argument {_brief(key)} (its arguments: {names})"
        problem = allowed[key](value)
        if problem:
            return problem
    if arch in ("cnn", "resnet"):
        if len(input_shape) != 3:
            return f"'{arch}' needs image inputs (channels, height, width), got {list(input_shape)}"
        if arch == "cnn" and min(input_shape[1:]) < 2:
            return f"'cnn' needs images of at least 2x2 pixels, got {list(input_shape)}"
    return None


def _resolve_factory(arch: str) -> tuple[Callable[..., nn.Module], bool]:
    """The factory of a built-in name, or of a package.module:factory that the USER typed.

    Importing a module runs its code: callers must never pass a name read from a file here
    unless the user named that same architecture on the command line (see checkpoint.py)."""
    if arch in ZOO:
        return ZOO[arch], True
    if not isinstance(arch, str) or ":" not in arch:
        raise InputError(
            f"unknown architecture '{shown(arch)}': use one of {', '.join(ZOO)} or package.module:factory"
        )
    if not is_factory_name(arch):
        raise InputError(
            f"architecture '{shown(arch)}' is not spelt package.module:factory (a module path of "
            "Python names, no leading dot, then ':' and the factory's name): fix --arch"
        )
    factory = load_factory(arch, "--arch", "architecture", InputError)
    if not callable(factory):
        raise InputError(
            f"'{arch}' is a {type(factory).__name__}, not a factory: --arch must name a function or "
            "class that returns a torch module"
        )
    return factory, False


def _failure(arch: str, kwargs: dict, reason: str, origin: str | None,
             hint: str = "fix --arch-kwargs") -> Exception:
    """The error for an architecture that cannot be built: the user's (--arch-kwargs, --data)
    or the file's (its metadata, when `origin` names the file)."""
    if origin is None:
        return InputError(f"cannot build '{shown(arch)}' with {_brief(kwargs, 120)}: {reason}: {hint}")
    return CheckpointError(
        f"{origin} describes a model that cannot be built ('{shown(arch)}' with {_brief(kwargs, 120)}: "
        f"{reason}): its metadata is damaged; pass --arch and --arch-kwargs yourself, or re-save it "
        "with 'deepsigns train'"
    )


def skeleton(
    arch: str, arch_kwargs: dict, input_shape: tuple[int, ...], num_classes: int, *,
    origin: str | None = None,
) -> nn.Module | None:
    """A built-in architecture built on the meta device: every shape, no memory, no weights.

    None for a user factory (its code is the user's, and may not run on the meta device).
    Arguments that are not the architecture's, an empty layer, or more than MAX_PARAMETERS
    parameters are refused: an InputError, or a CheckpointError naming `origin` (a file)."""
    if arch not in ZOO:
        return None
    if not isinstance(arch_kwargs, dict):
        raise _failure(arch, {}, f"its arguments must be a JSON object, got {_brief(arch_kwargs)}", origin)
    problem = shape_problem(input_shape, num_classes)
    if problem:
        raise _failure(arch, arch_kwargs, problem, origin, "use data of another shape (--data)")
    problem = _builtin_problem(arch, arch_kwargs, tuple(input_shape))
    if problem:
        image = problem.startswith(f"'{arch}' needs")
        raise _failure(arch, arch_kwargs, problem, origin,
                       "use --arch mlp for flat features" if image else "fix --arch-kwargs")
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("error")  # "Initializing zero-element tensors" and the like
            model = ZOO[arch](input_shape=tuple(input_shape), num_classes=num_classes, **arch_kwargs)
    except (TypeError, ValueError, RuntimeError, IndexError, UserWarning) as exc:
        raise _failure(arch, arch_kwargs, one_line(exc), origin) from None
    sizes = [t.numel() for t in model.state_dict().values()]
    if any(n == 0 for n in sizes):
        raise _failure(arch, arch_kwargs, "a layer would be empty", origin)
    if sum(sizes) > MAX_PARAMETERS:  # (the input's size counts: an image's pixels feed a dense layer)
        raise _failure(arch, arch_kwargs, f"{sum(sizes)} parameters for inputs of shape {list(input_shape)}, more "
                       f"than deepsigns handles ({MAX_PARAMETERS})", origin,
                       "fix --arch-kwargs, or give smaller inputs (--image-size)")
    return model


def build_model(
    arch: str, arch_kwargs: dict, input_shape: tuple[int, ...], num_classes: int, *,
    origin: str | None = None,
) -> nn.Module:
    """Instantiate an architecture. User factories get input_shape/num_classes if they accept them.

    A built-in one is first built on the meta device (`skeleton`), so that arguments asking for
    an absurd size fail before any memory is taken. `origin` names the file the arguments come
    from (its errors become CheckpointError); None means the command line (InputError)."""
    factory, builtin = _resolve_factory(arch)
    if builtin:
        skeleton(arch, arch_kwargs, input_shape, num_classes, origin=origin)
    kwargs = dict(arch_kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C function without a signature
        params = {}
    for name, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if builtin or name in params:
            kwargs.setdefault(name, value)
    # a built-in architecture fails on bad arguments alone; the user's code may fail in any way
    failures = (TypeError, ValueError, RuntimeError) if builtin else USER_CODE_FAILURES
    folder = current_folder()
    try:
        with folder_kept(folder):
            model = factory(**kwargs)
    except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
        raise
    except failures as exc:
        raise _failure(arch, arch_kwargs, one_line(exc) if builtin else user_failure(exc), origin) from None
    if not isinstance(model, nn.Module):
        raise InputError(f"factory '{shown(arch)}' returned {type(model).__name__}, not a torch module")
    if not builtin:
        # (a model of the user's that changes the current folder as it runs: the command's relative
        # paths, read and written after a pass, had been taken in the folder it went to)
        model.register_forward_hook(functools.partial(_folder_back, folder))
        _try_forward(model, arch, input_shape, num_classes)
    return model


def _folder_back(folder: str | None, module: nn.Module, args, output) -> None:
    """A forward hook: the current folder `folder` again after each pass (fileio.back_to)."""
    back_to(folder)


def _try_forward(model: nn.Module, arch: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """A user factory's model answers a batch of two inputs with one tensor of scores per input,
    or fails here with one line that names it: its forward is the user's code, which had failed
    deep in training as a bug of ours (exit 3), and a tuple (logits, features) likewise."""
    was_training = model.training
    where = next(model.parameters(), torch.empty(0)).device  # (a factory may give a model on a GPU)
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros((2, *input_shape), device=where))
    except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
        raise
    except USER_CODE_FAILURES as exc:
        raise InputError(f"the model of factory '{shown(arch)}' fails on a batch of inputs of shape "
                         f"{list(input_shape)} ({user_failure(exc)}): fix its forward") from None
    finally:
        model.train(was_training)
    # (more scores than the data's classes train and read as before: a head of 1000 on 10 classes)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < num_classes:
        got = f"a tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"the model of factory '{shown(arch)}' answers a batch of 2 inputs with {got}: deepsigns "
                         f"needs one tensor of at least {num_classes} scores per input, [2, {num_classes}] for the "
                         "data's classes; make its forward return that alone")


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
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            kind = f"a tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise SchemeError(f"layer '{layer}' gives {kind}, not one tensor of features per sample: choose "
                              f"another --layer from {', '.join(layer_names(model))}")
        store["act"] = t.reshape(len(t), -1)

    if at_input:
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: keep(out))
    try:
        yield store
    finally:
        handle.remove()


def captured(store: dict[str, torch.Tensor], layer: str, model: nn.Module) -> torch.Tensor:
    """The activation `capture` recorded in the forward pass just run (taken out of `store`);
    SchemeError when the pass did not run `layer`."""
    act = store.pop("act", None)
    if act is None:
        raise SchemeError(f"layer '{layer}' is not run by the model's forward pass: choose another --layer, one "
                          f"it runs (the model's layers: {', '.join(layer_names(model))})")
    return act


def layer_width(model: nn.Module, layer: str, input_shape: tuple[int, ...]) -> int:
    """M: the number of features at `layer` for one sample. SchemeError for a layer no trained
    weight computes (the model's input, or what a frozen part makes of it): no training moves it."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.enable_grad(), capture(model, layer) as store:
            model(torch.zeros(1, *input_shape, device=device))
    except RuntimeError as exc:
        raise CheckpointError(f"the model cannot run on inputs of shape {list(input_shape)}: {exc}") from None
    finally:
        model.train(was_training)
    act = captured(store, layer, model)
    if not act.requires_grad:
        raise SchemeError(f"layer '{layer}' is computed by no trainable weight (the model's input, or what a "
                          "frozen part makes of it): training cannot mark it; choose a layer after a trained one "
                          "(--layer)")
    return int(act.shape[1])


EVAL_VALUES = 1 << 21  # input values a forward pass outside training takes at once (8 MiB of float32)


def eval_rows(x, most: int = 1024) -> int:
    """Samples of x a forward pass outside training takes at once: at most `most`, and at most
    EVAL_VALUES input values (a model's activations grow with its input: 300 test images at
    96 x 96 taken at once had cost the CNN 1.7 GiB, whatever --batch-size said)."""
    shape = getattr(x, "shape", None)
    values = math.prod(shape[1:]) if shape is not None and len(shape) > 1 else 1
    return max(1, min(most, EVAL_VALUES // max(1, int(values))))


@torch.no_grad()
def activations(model: nn.Module, layer: str, x, batch_size: int = 1024) -> torch.Tensor:
    """The activation at `layer` for every sample of x (numpy or tensor), as a CPU (n, M) tensor."""
    model.eval()
    device = next(model.parameters()).device
    outs = []
    batch_size = eval_rows(x, batch_size)
    with capture(model, layer) as store:
        for i in range(0, len(x), batch_size):
            model(torch.as_tensor(x[i : i + batch_size], dtype=torch.float32, device=device))
            outs.append(captured(store, layer, model).float().cpu())
    return torch.cat(outs)
