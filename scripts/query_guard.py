#!/usr/bin/env python3
"""A thief's guard in front of a marked ONNX model: the black-box schemes' queries are not
natural inputs, and a graph that tells them apart answers them with another model.

    .venv/bin/python scripts/query_guard.py MARKED.onnx OTHER.onnx OUT.onnx [--levels 16]

OUT.onnx answers an input whose every value lies on the grid of `--levels` steps per unit
(the digits' pixels are k/16) with MARKED's scores, any other input with OTHER's (an
unmarked model). Every digits sample is on that grid, so OUT is as accurate as MARKED; the
output scheme's keys (uniform random inputs) and GradSigns' queries (samples blended with
noise, and central differences around them) are not. Both models must take one input of the
same name and shape and give scores of one shape. Nothing of deepsigns is used: the guard
is a plain graph built with onnx.helper. The README's figures (`verify` on OUT) come from it.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _renamed(model: onnx.ModelProto, prefix: str, keep: str) -> tuple[list, list, str]:
    """The model's nodes and initialisers with every tensor name but the input `keep` prefixed,
    and its first output's new name."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)

    def name(s: str) -> str:
        return s if s in (keep, "") else prefix + s

    for node in graph.node:
        node.name = prefix + node.name
        node.input[:] = [name(s) for s in node.input]
        node.output[:] = [name(s) for s in node.output]
    for tensor in graph.initializer:
        tensor.name = name(tensor.name)
    return list(graph.node), list(graph.initializer), name(model.graph.output[0].name)


def guard(marked: onnx.ModelProto, other: onnx.ModelProto, levels: int) -> onnx.ModelProto:
    source = marked.graph.input[0]
    rank = len(source.type.tensor_type.shape.dim)
    m_nodes, m_init, m_out = _renamed(marked, "marked_", source.name)
    o_nodes, o_init, o_out = _renamed(other, "other_", source.name)
    consts = [numpy_helper.from_array(np.array(float(levels), np.float32), "levels"),
              numpy_helper.from_array(np.array(1e-3, np.float32), "tolerance"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    check = [  # off the grid: some value further than the tolerance from k / levels
        helper.make_node("Mul", [source.name, "levels"], ["scaled"]),
        helper.make_node("Round", ["scaled"], ["rounded"]),
        helper.make_node("Sub", ["scaled", "rounded"], ["residue"]),
        helper.make_node("Abs", ["residue"], ["distance"]),
        helper.make_node("ReduceMax", ["distance"], ["furthest"], axes=list(range(1, rank)), keepdims=0),
        helper.make_node("Greater", ["furthest", "tolerance"], ["off_grid"]),
        helper.make_node("Unsqueeze", ["off_grid", "axis1"], ["off_grid_column"]),
        helper.make_node("Where", ["off_grid_column", o_out, m_out], ["scores"]),
    ]
    scores = onnx.ValueInfoProto()
    scores.CopyFrom(marked.graph.output[0])
    scores.name = "scores"
    graph = helper.make_graph(m_nodes + o_nodes + check, "query_guard", [source], [scores], m_init + o_init + consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("marked")
    parser.add_argument("other")
    parser.add_argument("out")
    parser.add_argument("--levels", type=int, default=16, help="grid steps per unit of input (digits: 16)")
    args = parser.parse_args()
    onnx.save(guard(onnx.load(args.marked), onnx.load(args.other), args.levels), args.out)


if __name__ == "__main__":
    main()
