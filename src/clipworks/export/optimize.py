"""A post-export pass that gives ONNX Runtime one fused attention node per transformer block.

torch exports ``nn.MultiheadAttention`` as a sequence-first chain: transpose the batch-first input,
project Q/K/V, split, reshape and transpose each head, two scaled matrix products around a softmax,
transpose back, project out, transpose back again. ORT's transformer optimizer does not recognise that
chain (it finds 0 attention nodes), so the CPU spends a quarter of an int8 ViT's time in Transpose.

This pass finds every such block by its softmax and writes it again as::

    x (B,S,D) -MatMul-> q|k|v (B,S,3D) -Split-> q, k, v -MultiHeadAttention(+bias, mask)-> (B,S,D) -MatMul-Add->

ONNX Runtime's own transformer optimizer then fuses what it does recognise (residual Add + LayerNorm
into SkipLayerNormalization, bias + GELU into BiasGelu, QuickGelu).

``com.microsoft.MultiHeadAttention`` is an ONNX Runtime contrib op, so the optimised graph is for ONNX
Runtime only; the plain graph stays beside it for other runtimes. The projections stay plain MatMuls, so
dynamic and static int8 quantise them as before. The exporter's parity check then runs on the
optimised graph, so a block matched wrongly fails the export instead of shipping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipworks.errors import status

MS_DOMAIN = "com.microsoft"
FUSED_OP = "MultiHeadAttention"
# Ops that only move data between the input projection and the two attention products; anything else
# on that path means the block is not the one this pass knows, and it is left as exported.
_LAYOUT_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Gather", "Mul", "Div", "Identity"}


@dataclass
class OptimizeReport:
    """What the pass did to one graph: recorded in ``clipworks.json`` beside the parity check."""

    attention_blocks: int  # softmax nodes in the exported graph
    fused: int  # of them rewritten as MultiHeadAttention
    transposes_before: int
    transposes_after: int
    nodes_before: int
    nodes_after: int

    def to_dict(self) -> dict[str, int]:
        return {
            "attention_blocks": self.attention_blocks,
            "fused_attention": self.fused,
            "transposes_before": self.transposes_before,
            "transposes_after": self.transposes_after,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


def fuse_attention(src: Path, dst: Path, num_heads: int) -> OptimizeReport:
    """Write ``src`` to ``dst`` with every recognised attention block fused; unmatched blocks are kept as they are."""
    import onnx

    from clipworks.export.graphs import SINGLE_FILE_LIMIT

    model = onnx.load(str(src))
    graph = _Graph(model)
    before, nodes_before = graph.count("Transpose"), len(model.graph.node)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    fused = sum(1 for s in softmaxes if _rewrite_block(graph, s, num_heads))
    if fused:
        graph.prune()
        if not any(op.domain == MS_DOMAIN for op in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        model = _ort_fusions(model, num_heads)
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > SINGLE_FILE_LIMIT
    onnx.save(model, str(dst), save_as_external_data=large, location=dst.name + ".data")
    after = sum(1 for n in model.graph.node if n.op_type == "Transpose")
    return OptimizeReport(len(softmaxes), fused, before, after, nodes_before, len(model.graph.node))


def _ort_fusions(model: Any, num_heads: int) -> Any:
    """ORT's CLIP fusions, offline: SkipLayerNormalization, BiasGelu, QuickGelu (its attention fusion finds none)."""
    import contextlib
    import io
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    hidden = next(_hidden_sizes(model), 0)
    quiet = contextlib.redirect_stdout(io.StringIO())
    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)  # it logs each fusion at INFO
    with quiet:
        optimized = optimize_model(
            model, model_type="clip", num_heads=num_heads, hidden_size=hidden,
            optimization_options=FusionOptions("clip"), opt_level=0, use_gpu=False,
        )  # fmt: skip
    return optimized.model


def _hidden_sizes(model: Any) -> Iterable[int]:
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == FUSED_OP and node.input[3] in inits:
            yield int(numpy_helper.to_array(inits[node.input[3]]).shape[0] // 3)


Tower = Literal["visual", "textual"]


def attention_heads(model: Any) -> dict[Tower, int | None]:
    """Heads per tower of an open_clip model: those of its first ``nn.MultiheadAttention``, None without one."""
    import torch

    heads: dict[Tower, int | None] = {"visual": None, "textual": None}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            tower: Tower = "visual" if name.startswith("visual.") else "textual"
            heads[tower] = heads[tower] or module.num_heads
    return heads


def optimize_towers(
    model: Any, graphs: dict[Tower, Path], log: Callable[[str], None] = status
) -> dict[str, dict[str, int]]:
    """Fuse attention in each tower's fp32 graph in place; returns what was done per tower, for ``clipworks.json``."""
    heads = attention_heads(model)
    done: dict[str, dict[str, int]] = {}
    for tower, path in graphs.items():
        count = heads[tower]
        if count is None:  # no torch attention module in this tower (e.g. a ResNet with a Hugging Face text tower)
            continue
        report = fuse_attention(path, path, count)
        done[tower] = report.to_dict()
        log(
            f"optimised {tower} graph: {report.fused}/{report.attention_blocks} attention blocks fused, "
            f"transposes {report.transposes_before} -> {report.transposes_after}, "
            f"nodes {report.nodes_before} -> {report.nodes_after}"
        )
    return done


def count_ops(path: Path, op_type: str) -> int:
    import onnx

    return sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op_type)


class _Graph:
    """Producer/consumer indexes and constant lookup over one ONNX graph, kept current through rewrites."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self._names = 0

    def producer(self, name: str) -> Any | None:
        return next((n for n in self.g.node if name in n.output), None)

    def consumers(self, name: str) -> list[Any]:
        return [n for n in self.g.node if name in n.input]

    def const(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def count(self, op_type: str) -> int:
        return sum(1 for n in self.g.node if n.op_type == op_type)

    def fresh(self, stem: str) -> str:
        self._names += 1
        return f"clipworks_{stem}_{self._names}"

    def add_init(self, stem: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(stem)
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.g.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def prune(self) -> None:
        """Drop nodes whose outputs nobody reads, then initialisers nobody reads."""
        needed = {o.name for o in self.g.output}
        keep: list[Any] = []
        for node in reversed(list(self.g.node)):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(i for i in node.input if i)
        del self.g.node[:]
        self.g.node.extend(reversed(keep))
        unused = [i for i in self.g.initializer if i.name not in needed]
        for init in unused:
            self.g.initializer.remove(init)
            self.inits.pop(init.name, None)


def _attr(node: Any, name: str) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _single(graph: _Graph, name: str, op_type: str) -> Any | None:
    users = graph.consumers(name)
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _rewrite_block(graph: _Graph, softmax: Any, num_heads: int) -> bool:
    """Match one sequence-first attention block around ``softmax`` and replace it; False leaves it untouched."""
    import onnx
    from onnx import helper

    scores = graph.producer(softmax.input[0])
    mask = None
    if scores is not None and scores.op_type == "Add":  # an additive mask (the text tower's causal mask)
        producers = [graph.producer(x) for x in scores.input]
        matmul_at = [i for i, p in enumerate(producers) if p is not None and p.op_type == "MatMul"]
        if len(matmul_at) != 1:
            return False
        mask = scores.input[1 - matmul_at[0]]
        scores = producers[matmul_at[0]]
    if scores is None or scores.op_type != "MatMul" or _attr(softmax, "axis") not in (-1, 3):
        return False
    weighted = _single(graph, softmax.output[0], "MatMul")
    if weighted is None or weighted.input[0] != softmax.output[0]:
        return False
    tail = _match_tail(graph, weighted)
    in_proj = _match_in_proj(graph, (scores.input[0], scores.input[1], weighted.input[1]))
    if tail is None or in_proj is None:
        return False
    x, weight, bias, scale = in_proj
    out_weight, out_bias, output, dead = tail
    hidden = weight.shape[0]
    if weight.shape != (hidden, 3 * hidden) or hidden % num_heads or out_weight.shape != (hidden, hidden):
        return False
    qkv_w = graph.add_init("qkv_weight", weight)
    qkv_b = graph.add_init("qkv_bias", bias)
    projected, query, key, value, attended, mixed = (
        graph.fresh(s) for s in ("qkv", "query", "key", "value", "mha", "out")
    )
    # CPU MultiHeadAttention has no packed (B,S,N,3,H) input, so one MatMul projects Q|K|V and a Split
    # hands them over; the bias is added inside the fused op.
    nodes = [
        helper.make_node("MatMul", [x, qkv_w], [projected], name=graph.fresh("MatMul")),
        helper.make_node("Split", [projected], [query, key, value], name=graph.fresh("Split"), axis=-1, num_outputs=3),
    ]
    inputs = [query, key, value, qkv_b]
    if mask is not None:
        inputs += ["", mask]  # key_padding_mask, attention_bias
    nodes.append(
        helper.make_node(
            FUSED_OP,
            inputs,
            [attended],
            name=graph.fresh(FUSED_OP),
            domain=MS_DOMAIN,
            num_heads=num_heads,
            scale=float(scale),
        )
    )
    # ONNX shape inference knows no contrib op; without a declared type the quantisers skip the out projection.
    graph.g.value_info.append(helper.make_tensor_value_info(attended, onnx.TensorProto.FLOAT, None))
    out_w = graph.add_init("out_weight", out_weight)
    if out_bias is None:
        nodes.append(helper.make_node("MatMul", [attended, out_w], [output], name=graph.fresh("MatMul")))
    else:
        nodes.append(helper.make_node("MatMul", [attended, out_w], [mixed], name=graph.fresh("MatMul")))
        nodes.append(helper.make_node("Add", [mixed, graph.add_init("out_bias", out_bias)], [output]))
    # The old tail's last node wrote ``output``; rename its output so the new chain is the only writer.
    dead.output[0] = graph.fresh("unused")
    at = list(graph.g.node).index(dead)
    for offset, node in enumerate(nodes):
        graph.g.node.insert(at + 1 + offset, node)
    return True


def _match_tail(graph: _Graph, weighted: Any) -> tuple[np.ndarray, np.ndarray | None, str, Any] | None:
    """Per-head output -> Transpose -> Reshape -> out projection -> Reshape -> Transpose(1,0,2): the block's end."""
    node = _single(graph, weighted.output[0], "Transpose")
    if node is None:
        return None
    node = _single(graph, node.output[0], "Reshape")
    if node is None:
        return None
    users = graph.consumers(node.output[0])
    if len(users) != 1:
        return None
    proj = users[0]
    out_bias = None
    if proj.op_type == "Gemm":
        weight = graph.const(proj.input[1])
        if weight is None or _attr(proj, "transA") or (_attr(proj, "alpha") or 1.0) != 1.0:
            return None
        weight = weight.T if _attr(proj, "transB") else weight
        if len(proj.input) > 2 and proj.input[2]:
            out_bias = graph.const(proj.input[2])
            if out_bias is None or (_attr(proj, "beta") or 1.0) != 1.0:
                return None
        last = proj
    elif proj.op_type == "MatMul":
        weight = graph.const(proj.input[1])
        last = proj
        add = _single(graph, proj.output[0], "Add")
        if add is not None:
            out_bias = next((b for b in (graph.const(i) for i in add.input) if b is not None), None)
            last = add if out_bias is not None else proj
    else:
        return None
    if weight is None:
        return None
    node = _single(graph, last.output[0], "Reshape")
    if node is None:
        return None
    node = _single(graph, node.output[0], "Transpose")
    if node is None or list(_attr(node, "perm") or []) != [1, 0, 2]:
        return None
    return weight.astype(np.float32), None if out_bias is None else out_bias.astype(np.float32), node.output[0], node


def _match_in_proj(graph: _Graph, starts: Iterable[str]) -> tuple[str, np.ndarray, np.ndarray, float] | None:
    """Walk up from Q, Kᵀ and V to the one ``Add(MatMul(Transpose(x), W), b)`` they share.

    Returns the batch-first ``x``, ``W``, ``b`` and the product of the scalar scales met on the way
    (torch scales Q and K by √(1/√H) each).
    """
    found: set[str] = set()
    scale = 1.0
    for start in starts:
        name = start
        while True:
            node = graph.producer(name)
            if node is None:
                return None
            if node.op_type == "Add" and _in_proj_add(graph, node) is not None:
                found.add(node.output[0])
                break
            if node.op_type not in _LAYOUT_OPS:
                return None
            if node.op_type in ("Mul", "Div"):
                factor = graph.const(node.input[1])
                if factor is None or factor.size != 1:
                    return None
                scale *= float(factor.reshape(-1)[0]) ** (1 if node.op_type == "Mul" else -1)
            name = node.input[0]
    if len(found) != 1:
        return None
    x, weight, bias = _in_proj_add(graph, graph.producer(found.pop()))  # type: ignore[arg-type,misc]  # matched above
    return x, weight, bias, scale


def _in_proj_add(graph: _Graph, add: Any) -> tuple[str, np.ndarray, np.ndarray] | None:
    matmul = graph.producer(add.input[0])
    bias = graph.const(add.input[1])
    if matmul is None or matmul.op_type != "MatMul" or bias is None:
        return None
    weight = graph.const(matmul.input[1])
    transpose = graph.producer(matmul.input[0])
    if weight is None or transpose is None or transpose.op_type != "Transpose":
        return None
    if list(_attr(transpose, "perm") or []) != [1, 0, 2]:
        return None
    return transpose.input[0], weight.astype(np.float32), bias.astype(np.float32)
