"""Capture a torch module with ``torch.export`` and translate its ATen graph into kiln IR.

The exported program has dynamic ``batch`` and ``seq``; torch's shape symbols
become kiln symbolic dims (the module declares the ranges the export allows
them, which prove slices such as MPT's ALiBi table's in bounds), and every
SymInt computation folds into attributes, so the kiln graph carries no shape
arithmetic at run time. Each ATen op maps to kiln ops through ``ATEN_TABLE``;
an op without an entry raises :class:`UnsupportedOpError` naming the op, the
graph node and the user's source line.
"""

from __future__ import annotations

import contextlib
import operator
import re
from typing import Any, Callable

import numpy as np
import torch

from kiln.frontend.mla import mla_as_custom_ops
from kiln.frontend.moe import moe_as_custom_ops
from kiln.ir.errors import ConfigError, UnsupportedOpError
from kiln.ir.graph import Function, Module, Value
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType, promote
from kiln.ir.verifier import verify_module

aten = torch.ops.aten

TORCH_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool",
}
_WRAPPED = "wrapped"
_INT_MAX = 2 ** 62


class _HFCausalLM(torch.nn.Module):
    """Calls a transformers causal LM the way kiln needs it: ids in, logits out, no cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.wrapped = model

    def forward(self, input_ids):
        return self.wrapped(input_ids=input_ids, use_cache=False).logits


class _Plain(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.wrapped = model

    def forward(self, input_ids):
        out = self.wrapped(input_ids)
        return out.logits if hasattr(out, "logits") else out


def is_transformers_model(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def export_model(model: torch.nn.Module, *, max_batch: int = 64, max_seq: int = 4096):
    """``torch.export`` with dynamic batch and seq; returns the ExportedProgram."""
    model = model.eval()
    wrapper = _HFCausalLM(model) if is_transformers_model(model) else _Plain(model)
    example = torch.zeros((2, 11), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    check_alibi_table(model, max_seq)
    with torch.no_grad(), static_rotary(model, max_seq), moe_as_custom_ops(model), mla_as_custom_ops(model):
        try:
            return torch.export.export(wrapper, (example,), dynamic_shapes={"input_ids": {0: batch, 1: seq}})
        except torch._dynamo.exc.UserError as err:
            limit = _length_limit(err, max_seq)
            if limit is None:
                raise
            raise limit from None


def _length_limit(err: Exception, max_seq: int) -> ConfigError | None:
    """torch.export's "Constraints violated (seq)" as one line, or None for another error: the model does not
    compute every length up to ``max_seq`` alike (a table it slices is shorter, say)."""
    text = str(err)
    guards = re.findall(r"in the specified range seq .* satisfy the generated guard (.*?)\.?$", text, re.MULTILINE)
    if "Constraints violated (seq)" not in text or not guards:
        return None
    suggested = re.search(r"seq = Dim\('seq', max=(\d+)\)", text)
    fix = f"--max-seq-len {suggested.group(1)} or less" if suggested else "a smaller --max-seq-len"
    return ConfigError(f"the model does not compute every length up to this compile's max_seq_len {max_seq} "
                       f"alike (torch.export found the guard {guards[0]}); compile with {fix}")


def check_alibi_table(model: torch.nn.Module, max_seq: int) -> None:
    """Refuse a compile longer than MPT's ALiBi table: transformers builds the biases for ``max_seq_len``
    positions once and slices the last ``seq`` of them, which reaches before the table past that length."""
    config = getattr(model, "config", None)
    if is_transformers_model(model) and getattr(config, "model_type", None) == "mpt" and \
            config.max_seq_len < max_seq:
        raise ConfigError(f"model config: max_seq_len {config.max_seq_len} is the length of MPT's ALiBi table, "
                          f"and this compile's max_seq_len is {max_seq}; compile with --max-seq-len "
                          f"{config.max_seq_len} or less")


@contextlib.contextmanager
def static_rotary(model: torch.nn.Module, max_seq: int):
    """Give every rotary embedding of ``model`` fixed frequencies for sequences up to ``max_seq`` while it is
    exported, or refuse (ConfigError) one whose frequencies would change within that length.

    transformers' dynamic-NTK and longrope rotaries recompute their frequencies from each call's positions
    (``dynamic_rope_update``), which torch.export cannot trace; up to their length limit those are the
    frequencies the rotary computed at init (``original_inv_freq``), so for the export the rotary is
    marked "default" (the update then leaves it alone) and given them. The module is restored afterwards.
    """
    from kiln.frontend.llama import LENGTH_DEPENDENT_ROPE_TYPES, LlamaRotaryEmbedding, check_rope_length

    restore = []
    try:
        for name, sub in model.named_modules():
            if isinstance(sub, LlamaRotaryEmbedding):
                check_rope_length(sub.rope_scaling, sub.max_position_embeddings, max_seq)
                continue
            rope_type = getattr(sub, "rope_type", None)
            if isinstance(rope_type, dict) and set(rope_type.values()) & set(LENGTH_DEPENDENT_ROPE_TYPES):
                raise ConfigError(f"model config: rope_parameters of {name or 'the model'} give per-layer-type rope "
                                  f"types {rope_type}; kiln captures dynamic or longrope rope only as the one rope "
                                  "type of a model")
            if rope_type not in LENGTH_DEPENDENT_ROPE_TYPES or not hasattr(sub, "original_inv_freq"):
                continue
            # Dynamic NTK's limit is the rotary's original_max_seq_len (the config's max_position_embeddings).
            check_rope_length(sub.config.rope_parameters, sub.original_max_seq_len, max_seq)
            restore.append((sub, rope_type, sub.inv_freq))
            sub.rope_type = "default"
            sub.inv_freq = sub.original_inv_freq.clone()
        yield
    finally:
        # New tensors were assigned, never written in place: the exported program keeps the fixed ones.
        for sub, rope_type, inv_freq in restore:
            sub.rope_type = rope_type
            sub.inv_freq = inv_freq


def capture(model: torch.nn.Module, *, max_batch: int = 64, max_seq: int = 4096) -> Module:
    """Capture ``model`` (``forward(input_ids) -> logits``) into a verified kiln module."""
    ep = export_model(model, max_batch=max_batch, max_seq=max_seq)
    module = _Translator(ep).run()
    module.metadata["capture"] = {"max_batch": max_batch, "max_seq": max_seq}
    verify_module(module)
    return module


# translation ------------------------------------------------------------------
def source_location(node: torch.fx.Node) -> str:
    """'module path (Type), file:line: code' from the exported node's metadata."""
    parts = []
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        path = re.sub(r"^L\['self'\]\.?", "", str(path)).replace(f"{_WRAPPED}.", "", 1)
        kind_name = getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1].strip("'>")
        parts.append(f"in module {path or '<root>'} ({kind_name})")
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if frames:
        file, line, func, code = frames[-1]
        parts.append(f"at {file}:{line} in {func}: {code.strip()}")
    return ", ".join(parts) or "no source information"


class _Translator:
    def __init__(self, ep):
        self.ep = ep
        self.module = Module()
        self.fn: Function = self.module.add_function("forward")
        self.values: dict = {}  # fx node -> kiln Value, list of Values, or a dim
        self.symbols: dict = {}  # sympy symbol -> kiln SymExpr
        self.node: torch.fx.Node | None = None

    # dims -------------------------------------------------------------------
    def dim(self, value) -> Any:
        """A Python int, SymInt or fx node holding one -> kiln dim."""
        if isinstance(value, torch.fx.Node):
            value = value.meta.get("val")
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, torch.SymInt):
            return self.sympy_dim(value.node.expr)
        raise self.unsupported(f"expected an integer size, found {value!r}")

    def sympy_dim(self, expr):
        import sympy

        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            if expr not in self.symbols:
                raise self.unsupported(f"size symbol {expr} is not derived from the input shape")
            return self.symbols[expr]
        if isinstance(expr, sympy.Add):
            out = 0
            for a in expr.args:
                out = out + self.sympy_dim(a)
            return out
        if isinstance(expr, sympy.Mul):
            out = 1
            for a in expr.args:
                out = out * self.sympy_dim(a)
            return out
        if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and int(expr.exp) > 0:
            base = self.sympy_dim(expr.base)
            out = 1
            for _ in range(int(expr.exp)):
                out = out * base
            return out
        if type(expr).__name__ == "FloorDiv":
            try:
                return self.sympy_dim(expr.args[0]) // self.sympy_dim(expr.args[1])
            except ValueError:
                pass
        if type(expr).__name__ in ("Max", "Min"):  # sympy's, or torch's own (torch.utils._sympy.functions)
            decided = self._decided_extremum(expr)
            if decided is not None:
                return self.sympy_dim(decided)
        raise self.unsupported(f"size expression {expr} is outside kiln's symbolic arithmetic")

    def declare_range(self, label: str, expr) -> None:
        """The module's range for ``label``: the sizes the export allows it (the Dim's min and max, which
        torch.export checked the program for). Its least is 1 where the export reports 2: torch assumes sizes
        0 and 1 away while tracing, and kiln runs one-token sequences through the same graph."""
        allowed = self.ep.range_constraints[expr]
        least = int(allowed.lower) if allowed.lower > 2 else 1
        self.module.declare_range(label, least, int(allowed.upper))

    def _decided_extremum(self, expr):
        """The argument of a Max/Min that wins over the whole range export allows its sizes (e.g. MPT's
        max(0, 1 - seq) is 0 for every seq >= 1), or None when which one wins depends on the sizes."""
        from torch.utils._sympy.value_ranges import bound_sympy

        ranges = dict(self.ep.range_constraints)
        bounds = [(arg, bound_sympy(arg, ranges)) for arg in expr.args]
        is_max = type(expr).__name__ == "Max"
        for arg, bound in bounds:
            others = [b for a, b in bounds if a is not arg]
            if is_max and all(bound.lower >= b.upper for b in others):
                return arg
            if not is_max and all(bound.upper <= b.lower for b in others):
                return arg
        return None

    def meta_type(self, node: torch.fx.Node) -> TensorType:
        val = node.meta["val"]
        if val.dtype not in TORCH_DTYPES:
            raise self.unsupported(f"dtype {val.dtype} is not supported")
        return TensorType(TORCH_DTYPES[val.dtype], tuple(self.dim(d) for d in val.shape))

    # errors -----------------------------------------------------------------
    def unsupported(self, why: str) -> UnsupportedOpError:
        node = self.node
        if node is None:
            return UnsupportedOpError(why)
        return UnsupportedOpError(f"cannot capture {node.target} (graph node %{node.name}): {why}; "
                                  f"{source_location(node)}")

    # values -----------------------------------------------------------------
    def tensor(self, arg) -> Value:
        value = self.values.get(arg) if isinstance(arg, torch.fx.Node) else None
        if not isinstance(value, Value):
            raise self.unsupported(f"expected a tensor argument, found {arg!r}")
        return value

    def emit(self, op: str, *inputs: Value, **attrs) -> Value:
        meta = {"source": source_location(self.node)} if self.node is not None else None
        return self.fn.add_node(op, inputs, attrs, name=self.node.name if self.node else "", meta=meta).output

    def cast(self, value: Value, dtype: str) -> Value:
        return value if value.type.dtype == dtype else self.emit("cast", value, dtype=dtype)

    def scalar(self, value, dtype: str) -> Value:
        if isinstance(value, torch.fx.Node):
            raise self.unsupported("a size-dependent scalar operand is not supported")
        return self.emit("constant", value=bool(value) if dtype == "bool" else
                         (int(value) if dtype.startswith(("i", "u")) else float(value)), dtype=dtype)

    # driver -----------------------------------------------------------------
    def run(self) -> Module:
        ep = self.ep
        sig = ep.graph_signature
        weight_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                     **sig.inputs_to_lifted_tensor_constants}
        user_inputs = list(sig.user_inputs)
        weight_names: dict = {}
        for node in ep.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                if node.name in weight_of:
                    if not node.users:
                        continue
                    target = weight_of[node.name]
                    tensor = ep.state_dict.get(target)
                    if tensor is None:
                        tensor = ep.constants[target]
                    name = target[len(_WRAPPED) + 1:] if target.startswith(_WRAPPED + ".") else target
                    key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
                    if key not in weight_names:
                        self.module.add_weight(name, _to_numpy(tensor))
                        weight_names[key] = name
                    self.values[node] = self.fn.emit("weight", name=weight_names[key],
                                                      value_name=name.replace(".", "_"))
                elif node.name in user_inputs:
                    val = node.meta["val"]
                    for axis, label in enumerate(("batch", "seq")):
                        d = val.shape[axis]
                        if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                            self.symbols[d.node.expr] = sym(label)
                            self.declare_range(label, d.node.expr)
                    self.values[node] = self.fn.add_param(node.name, self.meta_type(node))  # the forward argument's name
                else:
                    raise self.unsupported(f"unexpected graph input {node.name}")
            elif node.op == "call_function":
                self.translate(node)
            elif node.op == "output":
                outs = node.args[0]
                self.fn.set_results([self.tensor(o) for o in outs])
        self.node = None
        return self.module

    def translate(self, node: torch.fx.Node) -> None:
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool) and node.target not in ATEN_TABLE:
            self.values[node] = self.dim(val)  # size arithmetic folds into attributes
            return
        handler = ATEN_TABLE.get(node.target)
        if handler is None:
            raise self.unsupported("kiln has no mapping for this ATen op; add one to "
                                   "frontend/capture.py ATEN_TABLE")
        result = handler(self, node, *node.args, **node.kwargs)
        if result is None:
            return
        self.values[node] = result
        if isinstance(result, Value) and isinstance(val, torch.Tensor):
            expected = self.meta_type(node)
            if result.type != expected:
                raise AssertionError(f"capture of {node.target} (%{node.name}) gave {result.type}, "
                                     f"torch says {expected}; {source_location(node)}")


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


# ATen handlers --------------------------------------------------------------------
ATEN_TABLE: dict = {}


def handles(*targets):
    def register(fn: Callable):
        for t in targets:
            ATEN_TABLE[t] = fn
        return fn

    return register


def _binary_handler(kiln_op: str, *, compare=False, logical=False):
    def handler(tr: _Translator, node, a, b, alpha=1, **kw):
        out_dtype = TORCH_DTYPES[node.meta["val"].dtype]
        tensors = [x for x in (a, b) if isinstance(x, torch.fx.Node)]
        if compare:
            kinds = [tr.tensor(x).type.dtype for x in tensors]
            for x in (a, b):
                if isinstance(x, float) and not isinstance(x, bool):
                    kinds.append("f32")
            work = kinds[0]
            for k in kinds[1:]:
                work = promote(work, k)
        elif logical:
            work = "bool"
        else:
            work = out_dtype

        def operand(x):
            return tr.cast(tr.tensor(x), work) if isinstance(x, torch.fx.Node) else tr.scalar(x, work)

        lhs, rhs = operand(a), operand(b)
        if alpha != 1:
            rhs = tr.emit("mul", rhs, tr.scalar(alpha, work))
        return tr.emit(kiln_op, lhs, rhs)

    return handler


for _targets, _op, _kw in [
    ((aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, operator.add), "add", {}),
    ((aten.sub.Tensor, aten.sub.Scalar), "sub", {}),
    ((aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor), "mul", {}),
    ((aten.div.Tensor, aten.div.Scalar), "div", {}),
    ((aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar), "pow", {}),
    ((aten.maximum.default,), "maximum", {}),
    ((aten.minimum.default,), "minimum", {}),
    ((aten.eq.Tensor, aten.eq.Scalar), "eq", {"compare": True}),
    ((aten.ne.Tensor, aten.ne.Scalar), "ne", {"compare": True}),
    ((aten.lt.Tensor, aten.lt.Scalar), "lt", {"compare": True}),
    ((aten.le.Tensor, aten.le.Scalar), "le", {"compare": True}),
    ((aten.gt.Tensor, aten.gt.Scalar), "gt", {"compare": True}),
    ((aten.ge.Tensor, aten.ge.Scalar), "ge", {"compare": True}),
    ((aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default), "and", {"logical": True}),
    ((aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.logical_or.default), "or", {"logical": True}),
]:
    handles(*_targets)(_binary_handler(_op, **_kw))


@handles(aten.rsub.Scalar)
def _rsub(tr, node, a, b, alpha=1):
    dtype = TORCH_DTYPES[node.meta["val"].dtype]
    x = tr.cast(tr.tensor(a), dtype)
    if alpha != 1:
        x = tr.emit("mul", x, tr.scalar(alpha, dtype))
    return tr.emit("sub", tr.scalar(b, dtype), x)


def _unary_handler(kiln_op: str):
    def handler(tr, node, x, *args, **kw):
        return tr.emit(kiln_op, tr.tensor(x))

    return handler


for _target, _op in [
    (aten.neg.default, "neg"), (aten.exp.default, "exp"), (aten.log.default, "log"),
    (aten.sqrt.default, "sqrt"), (aten.rsqrt.default, "rsqrt"), (aten.reciprocal.default, "reciprocal"),
    (aten.sin.default, "sin"), (aten.cos.default, "cos"), (aten.tanh.default, "tanh"),
    (aten.abs.default, "abs"), (aten.erf.default, "erf"), (aten.sigmoid.default, "sigmoid"),
    (aten.silu.default, "silu"), (aten.relu.default, "relu"),
    (aten.logical_not.default, "not"), (aten.bitwise_not.default, "not"),
]:
    handles(_target)(_unary_handler(_op))


@handles(aten.gelu.default)
def _gelu(tr, node, x, approximate="none"):
    return tr.emit("gelu", tr.tensor(x), approximate=approximate)


@handles(aten.embedding.default)
def _embedding(tr, node, weight, ids, *args):
    return tr.emit("embedding", tr.tensor(weight), tr.tensor(ids))


@handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(tr, node, *args, dtype=None, **kw):
    if node.target == aten.arange.default:
        start, end, step = 0, args[0], 1
    else:
        start, end = args[0], args[1]
        step = args[2] if len(args) > 2 else 1
    out_dtype = TORCH_DTYPES[node.meta["val"].dtype]
    if any(isinstance(v, float) for v in (start, end, step)):
        raise tr.unsupported("arange with float bounds is not supported")
    return tr.emit("arange", start=tr.dim(start), end=tr.dim(end), step=tr.dim(step), dtype=out_dtype)


def _reshape_to_meta(tr, node, x, *args, **kw):
    return tr.emit("reshape", tr.tensor(x), shape=tr.meta_type(node).shape)


handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
        aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
        aten.unflatten.int)(_reshape_to_meta)


@handles(aten.expand.default, aten.expand_as.default)
def _expand(tr, node, x, sizes, *args, **kw):
    return tr.emit("expand", tr.tensor(x), shape=tr.meta_type(node).shape)


@handles(aten.repeat.default)
def _repeat(tr, node, x, repeats):
    """x.repeat(r0, r1, ...) (torch.tile): a unit axis before every axis of x, expanded to r_i, then merged."""
    v = tr.tensor(x)
    shape = (1,) * (len(repeats) - v.type.rank) + tuple(v.type.shape)
    spread = tuple(d for dim in shape for d in (1, dim))
    v = tr.emit("reshape", v, shape=spread)
    v = tr.emit("expand", v, shape=tuple(d for r, dim in zip(repeats, shape) for d in (tr.dim(r), dim)))
    return tr.emit("reshape", v, shape=tr.meta_type(node).shape)


@handles(aten.repeat_interleave.self_int)
def _repeat_interleave(tr, node, x, repeats, dim=None, output_size=None):
    """Each element repeated ``repeats`` times along ``dim`` (x flattened when dim is None): a unit axis after
    ``dim``, expanded to ``repeats``, then merged."""
    v = tr.tensor(x)
    if dim is None:
        v = tr.emit("reshape", v, shape=(_numel(v),))
        dim = 0
    dim = dim % v.type.rank
    shape = tuple(v.type.shape)
    v = tr.emit("reshape", v, shape=shape[:dim + 1] + (1,) + shape[dim + 1:])
    v = tr.emit("expand", v, shape=shape[:dim + 1] + (tr.dim(repeats),) + shape[dim + 1:])
    return tr.emit("reshape", v, shape=tr.meta_type(node).shape)


def _numel(v: Value):
    total = 1
    for d in v.type.shape:
        total = total * d
    return total


@handles(aten.transpose.int)
def _transpose(tr, node, x, d0, d1):
    v = tr.tensor(x)
    perm = list(range(v.type.rank))
    d0, d1 = d0 % v.type.rank, d1 % v.type.rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return tr.emit("permute", v, perm=tuple(perm))


@handles(aten.permute.default)
def _permute(tr, node, x, dims):
    v = tr.tensor(x)
    return tr.emit("permute", v, perm=tuple(d % v.type.rank for d in dims))


@handles(aten.t.default, aten.numpy_T.default)
def _t(tr, node, x):
    v = tr.tensor(x)
    return tr.emit("permute", v, perm=tuple(reversed(range(v.type.rank))))


def _slice_start(tr, size, start):
    start = tr.dim(start) if start is not None else 0
    if isinstance(start, int) and start < 0:
        start = size + start
    if isinstance(start, int) and isinstance(size, int):
        start = min(max(start, 0), size)
    return start


@handles(aten.slice.Tensor)
def _slice(tr, node, x, dim=0, start=None, end=None, step=1):
    v = tr.tensor(x)
    axis = dim % v.type.rank
    out_len = tr.meta_type(node).shape[axis]
    start = _slice_start(tr, v.type.shape[axis], start)
    if start == 0 and out_len == v.type.shape[axis] and step == 1:
        return v
    if step != 1 and not isinstance(out_len, int):
        raise tr.unsupported("a strided slice of a symbolic length is not supported")
    end = start + out_len if step == 1 else start + (out_len - 1) * step + 1
    return tr.emit("slice", v, axis=axis, start=start, end=end, step=step)


@handles(aten.select.int)
def _select(tr, node, x, dim, index):
    v = tr.tensor(x)
    axis = dim % v.type.rank
    start = _slice_start(tr, v.type.shape[axis], index)
    piece = tr.emit("slice", v, axis=axis, start=start, end=start + 1)
    return tr.emit("reshape", piece, shape=tr.meta_type(node).shape)


@handles(aten.cat.default, aten.concat.default)
def _cat(tr, node, tensors, dim=0):
    values = [tr.tensor(t) for t in tensors]
    values = [v for v in values if not (v.type.rank == 1 and v.type.shape[0] == 0)]
    rank = values[0].type.rank
    if len(values) == 1:
        return values[0]
    dtype = TORCH_DTYPES[node.meta["val"].dtype]
    return tr.emit("concat", *[tr.cast(v, dtype) for v in values], axis=dim % rank)


@handles(aten.stack.default)
def _stack(tr, node, tensors, dim=0):
    """torch.stack: each tensor with a unit axis at ``dim``, concatenated along it."""
    values = [tr.tensor(t) for t in tensors]
    dim = dim % (values[0].type.rank + 1)
    dtype = TORCH_DTYPES[node.meta["val"].dtype]
    parts = [tr.emit("reshape", tr.cast(v, dtype), shape=v.type.shape[:dim] + (1,) + v.type.shape[dim:])
             for v in values]
    return parts[0] if len(parts) == 1 else tr.emit("concat", *parts, axis=dim)


def _split_pieces(tr, node, x, sizes, dim):
    v = tr.tensor(x)
    axis = dim % v.type.rank
    outs, start = [], 0
    for i, piece in enumerate(node.meta["val"]):
        length = tr.dim(piece.shape[axis])
        outs.append(tr.emit("slice", v, axis=axis, start=start, end=start + length))
        start = start + length
    return outs


@handles(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections)
def _split(tr, node, x, sizes, dim=0):
    return _split_pieces(tr, node, x, sizes, dim)


@handles(aten.unbind.int)
def _unbind(tr, node, x, dim=0):
    axis = dim % tr.tensor(x).type.rank
    pieces = _split_pieces(tr, node, x, None, dim)
    return [tr.emit("reshape", p, shape=tuple(d for i, d in enumerate(p.type.shape) if i != axis))
            for p in pieces]


@handles(operator.getitem)
def _getitem(tr, node, seq, index):
    values = tr.values.get(seq)
    if not isinstance(values, list):
        raise tr.unsupported("getitem on something other than a split result")
    return values[index]


@handles(aten.linear.default)
def _linear(tr, node, x, w, b=None):
    inputs = [tr.tensor(x), tr.tensor(w)] + ([tr.tensor(b)] if b is not None else [])
    return tr.emit("linear", *inputs)


@handles(aten.addmm.default)
def _addmm(tr, node, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise tr.unsupported("addmm with alpha/beta other than 1")
    return tr.emit("add", tr.emit("matmul", tr.tensor(a), tr.tensor(b)), tr.tensor(bias))


@handles(aten.baddbmm.default)
def _baddbmm(tr, node, bias, a, b, beta=1, alpha=1):
    """beta * bias + alpha * (a @ b) (BLOOM adds its ALiBi biases to the attention scores this way)."""
    product = tr.emit("matmul", tr.tensor(a), tr.tensor(b))
    if alpha != 1:
        product = tr.emit("mul", product, tr.scalar(alpha, product.type.dtype))
    added = tr.tensor(bias)
    if beta == 0:
        return product
    if beta != 1:
        added = tr.emit("mul", added, tr.scalar(beta, added.type.dtype))
    return tr.emit("add", added, product)


@handles(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(tr, node, a, b):
    va, vb = tr.tensor(a), tr.tensor(b)
    if va.type.rank < 2 or vb.type.rank < 2:
        raise tr.unsupported("matmul of a vector is not supported")
    return tr.emit("matmul", va, vb)


@handles(aten.layer_norm.default, aten.native_layer_norm.default)
def _layer_norm(tr, node, x, normalized_shape, weight=None, bias=None, eps=1e-5, *args):
    v = tr.tensor(x)
    if len(normalized_shape) != 1:
        raise tr.unsupported("layer_norm over more than the last axis")
    width = v.type.shape[-1]
    w = tr.tensor(weight) if weight is not None else tr.emit("full", shape=(width,), value=1.0, dtype=v.type.dtype)
    b = tr.tensor(bias) if bias is not None else tr.emit("full", shape=(width,), value=0.0, dtype=v.type.dtype)
    return tr.emit("layer_norm", v, w, b, eps=float(eps))


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(tr, node, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    inputs = [tr.tensor(q), tr.tensor(k), tr.tensor(v)]
    if attn_mask is not None:
        inputs.append(tr.tensor(attn_mask))
    return tr.emit("sdpa", *inputs, is_causal=bool(is_causal),
                   scale=None if scale is None else float(scale), enable_gqa=bool(enable_gqa))


def _reduce_handler(kiln_op):
    def handler(tr, node, x, dims=None, keepdim=False, dtype=None):
        v = tr.tensor(x)
        axes = tuple(range(v.type.rank)) if dims is None or dims == [] else tuple(d % v.type.rank for d in dims)
        out = tr.emit(kiln_op, v, axes=axes, keepdims=bool(keepdim))
        return tr.cast(out, TORCH_DTYPES[node.meta["val"].dtype])

    return handler


handles(aten.mean.dim)(_reduce_handler("mean"))
handles(aten.sum.dim_IntList)(_reduce_handler("sum"))
handles(aten.amax.default)(_reduce_handler("max"))
handles(aten.amin.default)(_reduce_handler("min"))


@handles(aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
def _softmax(tr, node, x, dim, *args, **kw):
    v = tr.tensor(x)
    out_dtype = TORCH_DTYPES[node.meta["val"].dtype]
    return tr.emit("softmax", tr.cast(v, out_dtype), axis=dim % v.type.rank)


@handles(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(tr, node, x, low=None, high=None):
    if node.target == aten.clamp_max.default:
        low, high = None, low
    out = tr.tensor(x)
    dtype = out.type.dtype
    for bound, op in ((low, "maximum"), (high, "minimum")):
        if bound is not None:
            out = tr.emit(op, out, tr.scalar(bound, dtype))
    return out


@handles(aten.linalg_vector_norm.default)
def _vector_norm(tr, node, x, ord=2, dim=None, keepdim=False, dtype=None):
    if ord != 2 or dtype is not None:
        raise tr.unsupported(f"only the Euclidean norm (ord 2, the input's dtype) is supported, found ord {ord!r}")
    v = tr.tensor(x)
    axes = tuple(range(v.type.rank)) if not dim else tuple(d % v.type.rank for d in dim)
    return tr.emit("sqrt", tr.emit("sum", tr.emit("mul", v, v), axes=axes, keepdims=bool(keepdim)))


@handles(aten.cumsum.default)
def _cumsum(tr, node, x, dim, dtype=None):
    v = tr.tensor(x)
    return tr.emit("cumsum", v, axis=dim % v.type.rank, dtype=TORCH_DTYPES[node.meta["val"].dtype])


@handles(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(tr, node, cond, a, b):
    dtype = TORCH_DTYPES[node.meta["val"].dtype]

    def operand(x):
        return tr.cast(tr.tensor(x), dtype) if isinstance(x, torch.fx.Node) else tr.scalar(x, dtype)

    return tr.emit("where", tr.tensor(cond), operand(a), operand(b))


@handles(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(tr, node, x, mask, value):
    v = tr.tensor(x)
    fill = tr.cast(tr.tensor(value), v.type.dtype) if isinstance(value, torch.fx.Node) else tr.scalar(value, v.type.dtype)
    return tr.emit("where", tr.tensor(mask), fill, v)


@handles(aten.full.default, aten.new_full.default, aten.new_ones.default, aten.new_zeros.default,
         aten.ones.default, aten.zeros.default, aten.full_like.default, aten.ones_like.default,
         aten.zeros_like.default, aten.scalar_tensor.default, aten.new_empty.default, aten.empty.memory_format)
def _full(tr, node, *args, **kw):
    target = node.target
    if target in (aten.new_ones.default, aten.ones.default, aten.ones_like.default):
        value = 1
    elif target in (aten.new_zeros.default, aten.zeros.default, aten.zeros_like.default,
                    aten.new_empty.default, aten.empty.memory_format):
        value = 0
    elif target == aten.scalar_tensor.default:
        value = args[0]
    elif target == aten.full.default:
        value = args[1]
    else:
        value = args[-1] if target == aten.full_like.default else args[2]
    t = tr.meta_type(node)
    if isinstance(value, torch.fx.Node):
        raise tr.unsupported("a fill value computed at run time is not supported")
    value = bool(value) if t.dtype == "bool" else (float(value) if t.dtype.startswith(("f", "b")) else int(value))
    if t.dtype == "bf16":
        value = float(value)
    return tr.emit("full", shape=t.shape, value=value, dtype=t.dtype)


@handles(aten.index.Tensor)
def _index(tr, node, x, indices):
    axis = 0
    while axis < len(indices) and indices[axis] is None:
        axis += 1
    rest = list(indices[axis:])
    while rest and rest[-1] is None:
        rest.pop()
    if any(i is None for i in rest):
        raise tr.unsupported("index tensors separated by full slices are not supported")
    return tr.emit("index", tr.tensor(x), *[tr.tensor(i) for i in rest], axis=axis)


@handles(aten.diff.default)
def _diff(tr, node, x, n=1, dim=-1, prepend=None, append=None):
    if n != 1:
        raise tr.unsupported("diff with n != 1")
    v = tr.tensor(x)
    axis = dim % v.type.rank
    parts = ([tr.tensor(prepend)] if prepend is not None else []) + [v] + \
            ([tr.tensor(append)] if append is not None else [])
    full = tr.emit("concat", *parts, axis=axis) if len(parts) > 1 else v
    length = full.type.shape[axis]
    upper = tr.emit("slice", full, axis=axis, start=1, end=length)
    lower = tr.emit("slice", full, axis=axis, start=0, end=length - 1)
    return tr.emit("sub", upper, lower)


# mixture of experts: frontend/moe.py runs routers and fused experts modules as these custom ops ---------------
@handles(torch.ops.kiln.moe_route.default)
def _moe_route(tr, node, logits, correction_bias, top_k, scoring, normalize, num_groups, topk_groups,
               group_score, scaling):
    inputs = [tr.tensor(logits)] + ([tr.tensor(correction_bias)] if correction_bias is not None else [])
    attrs = dict(top_k=int(top_k), scoring=scoring, normalize=bool(normalize), num_groups=int(num_groups),
                 topk_groups=int(topk_groups), group_score=group_score, scaling=float(scaling))
    routed = tr.fn.add_node("moe_route", inputs, attrs, name=node.name, meta={"source": source_location(node)})
    return list(routed.outputs)


@handles(torch.ops.kiln.moe_experts.default)
def _moe_experts(tr, node, x, weights, ids, gate_up, down, activation):
    dtype = TORCH_DTYPES[node.meta["val"].dtype]
    return tr.emit("moe_experts", tr.cast(tr.tensor(x), dtype), tr.tensor(weights), tr.tensor(ids),
                   tr.tensor(gate_up), tr.tensor(down), activation=activation)


# DeepSeek's latent attention: frontend/mla.py runs it absorbed around this custom op ----------------------------
@handles(torch.ops.kiln.latent_attention.default)
def _latent_attention(tr, node, q, latent, scale, value_dim, expanded_k_dim, expanded_v_dim):
    query = tr.tensor(q)
    return tr.emit("latent_attention", query, tr.tensor(latent), num_heads=query.type.shape[1], scale=float(scale),
                   value_dim=int(value_dim), expanded_k_dim=int(expanded_k_dim), expanded_v_dim=int(expanded_v_dim))


def _identity(tr, node, x, *args, **kw):
    return tr.tensor(x)


handles(aten.alias.default, aten.contiguous.default, aten.clone.default, aten.lift_fresh_copy.default,
        aten.detach.default, aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
        aten.alias_copy.default)(_identity)


@handles(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default)
def _to(tr, node, x, *args, **kw):
    return tr.cast(tr.tensor(x), TORCH_DTYPES[node.meta["val"].dtype])


def _ignore(tr, node, *args, **kw):
    return None


handles(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
        aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default)(_ignore)
