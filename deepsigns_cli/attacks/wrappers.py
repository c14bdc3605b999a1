"""Deployment wrappers: the victim's ONNX graph, unchanged, behind a few nodes that change
what the deployed model answers (rounded or noisy probabilities, noisy inputs, the top label
only). The weights are never touched, so these attacks take and write ONNX only.

The victim may come from anywhere (a torch export, scikit-learn through skl2onnx, a hostile
file), so its names are data: every tensor name of its graphs is given a prefix that none of
the names we keep or add can start with, and our own nodes use another. The output to wrap
is the one --output names, else the first scores or probabilities output (`runtime.output_kind`
on each graph output); one of integers (scores, or a top-k's classes ranked) is not changed.
skl2onnx's ZipMap output (a sequence of maps) is unwrapped to the
probability tensor the ZipMap node reads, when its classes are 0 .. C-1 in order.

One module serves four registry rows: `ATTACKS` maps each row's name to its class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import bounded_rows, take
from ..errors import InputError, OnnxError, one_line
from .base import Attack, AttackContext

__all__ = ["RoundScores", "NoiseScores", "NoiseInputs", "LabelOnly", "ATTACKS"]

MIN_OPSET = 13  # Softmax over one axis, ReduceSum with axes as an input
PROBABILITY_TOLERANCE = 0.02  # a row of non-negative values summing to 1 within this is probabilities
_FLOAT, _INT64 = 1, 7  # TensorProto.FLOAT, INT64
_REAL_ELEMS = {1, 10, 11}  # FLOAT, FLOAT16, DOUBLE
_BFLOAT16 = 16


def _fresh_prefix(base: str, names) -> str:
    """`base`, or `base` with underscores before its slash, such that no name starts with it."""
    stem = base.rstrip("/")
    prefix = base
    while any(name.startswith(prefix) for name in names):
        stem += "_"
        prefix = stem + "/"
    return prefix


def _rename_tensors(graph, prefix: str, keep: set[str]) -> None:
    """Prefix every tensor and node name of `graph` and its subgraphs, except the names in
    `keep` (and empty names: missing optional inputs). One rule for every scope, so a
    subgraph's references to outer names stay right."""

    def new(name: str) -> str:
        return name if not name or name in keep else prefix + name

    stack = [graph]
    while stack:
        g = stack.pop()
        for info in (*g.input, *g.output, *g.value_info):
            info.name = new(info.name)
        for tensor in g.initializer:
            tensor.name = new(tensor.name)
        for sparse in g.sparse_initializer:
            sparse.values.name = new(sparse.values.name)
            sparse.indices.name = new(sparse.indices.name)
        for annotation in g.quantization_annotation:
            annotation.tensor_name = new(annotation.tensor_name)
        for node in g.node:
            if node.name:
                node.name = prefix + node.name
            renamed_in, renamed_out = [new(n) for n in node.input], [new(n) for n in node.output]
            del node.input[:]
            node.input.extend(renamed_in)
            del node.output[:]
            node.output.extend(renamed_out)
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _dims(info) -> list | None:
    """A tensor's declared dims (int, str for a named one, None for an unknown one), or None."""
    if info.type.WhichOneof("value") != "tensor_type" or not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in info.type.tensor_type.shape.dim]


def _reader_choice(outputs) -> tuple[str, str] | None:
    """(name, kind) of the output the reader reads (`OnnxModel.choose_output`): the first
    scores or probabilities, else the first labels; None when there is none."""
    from ..runtime import output_kind

    kinds = [(o.name, output_kind(o)[0]) for o in outputs]
    for wanted in (("scores", "probabilities"), ("labels",)):
        for name, kind in kinds:
            if kind in wanted:
                return name, kind
    return None


class _Wrapping:
    """The victim's model with its names prefixed, and the nodes a wrapper adds: `pre` (they
    compute the victim's input from the new graph input) and `post` (they read its outputs)."""

    def __init__(self, victim, attack: str, *, own_outputs: tuple[str, ...] = (), keep_outputs: bool = False):
        import onnx

        if not isinstance(victim, onnx.ModelProto):
            raise InputError(f"attack {attack} wraps an ONNX model: give an .onnx file or a checkpoint")
        self.attack = attack
        self.model = onnx.ModelProto()
        self.model.CopyFrom(victim)
        graph = self.model.graph
        self._check_opset()
        initializers = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1:
            raise InputError(f"attack {attack} wraps a model with one input; this one has {len(inputs)}: "
                             "export the classifier alone")
        self.victim_outputs = [_copy(o) for o in graph.output]
        self.input = _copy(inputs[0])
        original = self.input.name
        # the victim's outputs keep their names when the wrapper answers with them (noise-inputs),
        # except those that are an input or an initializer (renamed with what they name)
        keep = ({o.name for o in graph.output} - initializers - {original}) if keep_outputs else set()
        kept = keep | {original, *own_outputs}
        self.victim_prefix = _fresh_prefix("victim/", kept)
        self.own_prefix = _fresh_prefix("wrap/", kept)
        _rename_tensors(graph, self.victim_prefix, keep)
        # the new graph's input keeps the victim's name, unless one of our outputs has it
        self.feed = original if original not in own_outputs else self.own_prefix + "input"
        self.victim_input = self.victim_prefix + original
        self.pre: list = []
        self.post: list = []
        self._count = 0

    def _check_opset(self) -> None:
        """The victim's default-domain opset is kept: MIN_OPSET or later (added when it has none)."""
        from onnx import helper

        versions = [o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        if not versions:  # (a graph of ai.onnx.ml operators only)
            self.model.opset_import.append(helper.make_opsetid("", MIN_OPSET))
        elif max(versions) < MIN_OPSET:
            raise InputError(f"attack {self.attack} needs a model at ONNX opset {MIN_OPSET} or later, this one "
                             f"is at opset {max(versions)}: re-export it with opset {MIN_OPSET} or later")

    # ------------------------------------------------------------------ building
    def name(self, what: str) -> str:
        self._count += 1
        return f"{self.own_prefix}{what}{self._count}"

    def node(self, nodes: list, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        """Append one node (default domain) to `nodes`; its output's name."""
        from onnx import helper

        output = output or self.name(op.lower())
        nodes.append(helper.make_node(op, inputs, [output], name=self.name(op), **attrs))
        return output

    def constant(self, nodes: list, value: np.ndarray) -> str:
        """A constant as a node (initializers would have to be graph inputs too below IR 4)."""
        from onnx import numpy_helper

        return self.node(nodes, "Constant", [], value=numpy_helper.from_array(np.asarray(value)))

    def batch_dim(self, output=None):
        """The batch dimension as declared by `output` (a tensor), else by the input."""
        for info in (output, self.input):
            dims = _dims(info) if info is not None else None
            if dims:
                return dims[0]
        return None

    # ------------------------------------------------------------------ the victim's answers
    def chosen(self, output: str | None = None) -> tuple[str, str]:
        """(name, kind) of the victim output to attack: `output` (--output), else the one the
        reader reads. Outputs of integers, which may be scores or classes ranked (a top-k's
        indices), are refused where the wrapper changes scores."""
        from ..runtime import output_kind

        if output is None:
            choice = _reader_choice(self.victim_outputs)
        else:  # (a name the victim's accuracy was read on: checked there)
            choice = next(((o.name, output_kind(o)[0]) for o in self.victim_outputs if o.name == output), None)
        if choice is None:
            raise OnnxError(f"the victim has no output deepsigns can read: attack {self.attack} needs its "
                            "class scores, probabilities or labels")
        return choice

    def real_scores(self, name: str, kind: str) -> tuple[str, int | None]:
        """`scores` of an output of real numbers; an output of labels, or of integers, refused."""
        info = next(o for o in self.victim_outputs if o.name == name)
        elem = info.type.tensor_type.elem_type if info.type.WhichOneof("value") == "tensor_type" else None
        if kind == "labels" or (kind == "scores" and elem not in (*_REAL_ELEMS, _BFLOAT16)):
            what = ("labels only" if kind == "labels"
                    else "integers (class scores, or classes ranked: a top-k's indices)")
            raise InputError(f"attack {self.attack} changes the victim's class scores, but its output "
                             f"'{one_line(name, 60)}' holds {what}: give a model that answers real-valued scores "
                             "or probabilities, or choose such an output with --output")
        return self.scores(name, kind)

    def scores(self, name: str, kind: str) -> tuple[str, int | None]:
        """The chosen output as a float tensor (batch, C) in the renamed graph, and C if known."""
        if kind == "probabilities":
            tensor, classes = self._zipmap_input(name)
        else:
            tensor = self.victim_prefix + name
            dims = _dims(next(o for o in self.victim_outputs if o.name == name))
            known = dims is not None and all(isinstance(d, int) for d in dims[1:])
            classes = int(np.prod(dims[1:])) if known else None
        flat = self.node(self.post, "Flatten", [tensor], axis=1)
        return self.node(self.post, "Cast", [flat], to=_FLOAT), classes

    def _zipmap_input(self, name: str) -> tuple[str, int]:
        """The probability tensor that skl2onnx's ZipMap turns into output `name`, and C."""
        from onnx import helper

        target = self.victim_prefix + name
        for node in self.model.graph.node:
            if node.op_type == "ZipMap" and node.domain == "ai.onnx.ml" and list(node.output) == [target]:
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                labels = list(attrs.get("classlabels_int64s", []))
                if not labels or labels != list(range(len(labels))) or not node.input:
                    break
                return node.input[0], len(labels)
        raise InputError(f"the victim's output '{one_line(name, 60)}' is a sequence of maps that attack "
                         f"{self.attack} cannot unwrap (it needs a ZipMap over classes 0 .. C-1): export "
                         "the classifier's probabilities as a tensor (skl2onnx: options zipmap=False)")

    def probabilities(self, scores: str) -> str:
        """Rows of probabilities from rows of scores: a row that already is probabilities
        (non-negative, summing to 1 within PROBABILITY_TOLERANCE) as it is, any other through
        Softmax. Decided row by row in the graph, so a victim's logits and probabilities both work."""
        post, node = self.post, self.node
        axes = self.constant(post, np.array([1], dtype=np.int64))
        one = self.constant(post, np.array(1.0, dtype=np.float32))
        tolerance = self.constant(post, np.array(PROBABILITY_TOLERANCE, dtype=np.float32))

        def near_one(total: str) -> str:
            gap = node(post, "Abs", [node(post, "Sub", [total, one])])
            return node(post, "LessOrEqual", [gap, tolerance])

        total = node(post, "ReduceSum", [scores, axes], keepdims=1)
        magnitude = node(post, "ReduceSum", [node(post, "Abs", [scores]), axes], keepdims=1)
        already = node(post, "And", [near_one(total), near_one(magnitude)])
        softmax = node(post, "Softmax", [scores], axis=1)
        return node(post, "Where", [already, scores, softmax])

    def seed(self, ctx: AttackContext) -> float:
        """A seed for RandomNormalLike (a float attribute: below 2**24 it is exact)."""
        return float(ctx.rng.integers(1, 2**24))

    # ------------------------------------------------------------------ the result
    def finish(self, outputs: list) -> Any:
        """The wrapped model: our input, `pre`, the victim's nodes, `post`, these outputs."""
        import onnx

        graph = self.model.graph
        if not self.pre:
            self.node(self.pre, "Identity", [self.feed], self.victim_input)
        victim_nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend([*self.pre, *victim_nodes, *self.post])
        # initializers listed as inputs (IR below 4) stay inputs, with their new names
        others = [_copy(i) for i in graph.input if i.name != self.victim_input]
        feed = _copy(self.input)
        feed.name = self.feed
        del graph.input[:]
        graph.input.extend([feed, *others])
        del graph.output[:]
        graph.output.extend(outputs)
        try:
            onnx.checker.check_model(self.model)
        except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
            raise OnnxError(f"the victim wrapped by attack {self.attack} fails the ONNX checker "
                            f"({one_line(exc, 200)}): check the victim with onnx.checker") from None
        return self.model


def _copy(info):
    import onnx

    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    return out


# --------------------------------------------------------------------------- the attacks


class _ScoresWrapper(Attack):
    """The victim's probabilities, changed by `change`, as output "probabilities" (batch, C)."""

    def change(self, w: _Wrapping, probs: str, ctx: AttackContext) -> tuple[str, dict]:
        raise NotImplementedError

    def run(self, victim, ctx: AttackContext):
        from onnx import helper

        w = _Wrapping(victim, self.name, own_outputs=("probabilities",))
        name, kind = w.chosen(ctx.output)
        scores, classes = w.real_scores(name, kind)
        changed, params = self.change(w, w.probabilities(scores), ctx)
        w.node(w.post, "Identity", [changed], "probabilities")
        batch = w.batch_dim(next(o for o in w.victim_outputs if o.name == name))
        output = helper.make_tensor_value_info("probabilities", _FLOAT, [batch, classes or "classes"])
        return w.finish([output]), {**params, "wrapped_output": name}


class RoundScores(_ScoresWrapper):
    name = "round-scores"

    def change(self, w, probs, ctx):
        decimals = int(ctx.option("decimals", 2))
        scale = w.constant(w.post, np.array(10.0**decimals, dtype=np.float32))
        rounded = w.node(w.post, "Round", [w.node(w.post, "Mul", [probs, scale])])
        return w.node(w.post, "Div", [rounded, scale]), {"decimals": decimals}


class NoiseScores(_ScoresWrapper):
    name = "noise-scores"

    def change(self, w, probs, ctx):
        sigma = float(ctx.option("sigma", 0.01))
        if sigma == 0:  # (onnxruntime aborts on RandomNormalLike with scale 0)
            return probs, {"sigma": sigma}
        noise = w.node(w.post, "RandomNormalLike", [probs], dtype=_FLOAT, mean=0.0, scale=sigma,
                       seed=w.seed(ctx))
        return w.node(w.post, "Add", [probs, noise]), {"sigma": sigma}


class NoiseInputs(Attack):
    """Gaussian noise on every input, its spread `sigma` times the standard deviation of the
    test inputs; the victim's outputs as they are."""

    name = "noise-inputs"

    def run(self, victim, ctx: AttackContext):
        w = _Wrapping(victim, self.name, keep_outputs=True)
        elem = w.input.type.tensor_type.elem_type if w.input.type.WhichOneof("value") == "tensor_type" else None
        if elem not in _REAL_ELEMS:
            raise InputError(f"attack {self.name} adds noise to real-valued inputs; the victim's input "
                             f"'{one_line(w.input.name, 60)}' is not a float tensor: export it with a float input")
        sigma = float(ctx.option("sigma", 0.1))
        # the data's spread, on at most STAT_ROWS test rows (a lazy split is decoded that far only)
        x = ctx.data.x_test
        spread = float(np.std(take(x, bounded_rows(len(x)))[:], dtype=np.float64)) if len(x) else 0.0
        scale = sigma * spread
        if sigma > 0 and not spread > 0:  # (the report had said sigma 10 of a graph with no noise)
            raise InputError(f"attack {self.name} adds noise relative to the spread of the test inputs, and "
                             "these do not vary: give --data whose test split does")
        if scale > 0:  # (onnxruntime aborts on RandomNormalLike with scale 0: no noise, no nodes)
            noise = w.node(w.pre, "RandomNormalLike", [w.feed], dtype=_FLOAT, mean=0.0, scale=scale,
                           seed=w.seed(ctx))
            if elem != _FLOAT:
                noise = w.node(w.pre, "Cast", [noise], to=elem)
            w.node(w.pre, "Add", [w.feed, noise], w.victim_input)
        outputs = [_copy(o) for o in w.model.graph.output]
        choice = _reader_choice(w.victim_outputs) if ctx.output is None else (ctx.output,)
        return w.finish(outputs), {"sigma": sigma, "wrapped_output": choice[0] if choice else None}


class LabelOnly(Attack):
    """Only the top label: ArgMax over the class axis, output "label" (int64, batch)."""

    name = "label-only"

    def run(self, victim, ctx: AttackContext):
        from onnx import helper

        w = _Wrapping(victim, self.name, own_outputs=("label",))
        name, kind = w.chosen(ctx.output)
        info = next(o for o in w.victim_outputs if o.name == name)
        if kind == "labels":  # labels already: one int64 per input
            shape = w.constant(w.post, np.array([-1], dtype=np.int64))
            labels = w.node(w.post, "Cast", [w.victim_prefix + name], to=_INT64)
            w.node(w.post, "Reshape", [labels, shape], "label")
        else:
            scores, _ = w.real_scores(name, kind)
            w.node(w.post, "ArgMax", [scores], "label", axis=1, keepdims=0)
        output = helper.make_tensor_value_info("label", _INT64, [w.batch_dim(info)])
        return w.finish([output]), {"wrapped_output": name}


ATTACKS = {cls.name: cls for cls in (RoundScores, NoiseScores, NoiseInputs, LabelOnly)}
