"""Tests for the IR verifier: valid modules pass, and each invariant its docstring lists is caught.

Every test builds a valid module, plants one defect through internal fields, and
expects a one-line VerificationError that names the function and the problem.
"""

import numpy as np
import pytest

from kiln.ir.errors import VerificationError
from kiln.ir.graph import Module
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify_function, verify_module

batch, seq = sym("batch"), sym("seq")


def build() -> Module:
    """x[batch, seq, 8] -> layer_norm(linear(x) + x) -> softmax; plus a second function."""
    module = Module()
    module.add_weight("fc.weight", np.ones((8, 8), np.float32))
    module.add_weight("ln.weight", np.ones(8, np.float32))
    module.add_weight("ln.bias", np.zeros(8, np.float32))
    module.add_weight("table", type=TensorType("f16", (16, 8)))  # declared, array not loaded
    fn = module.add_function("main")
    x = fn.add_param("x", TensorType("f32", (batch, seq, 8)))
    w = fn.emit("weight", name="fc.weight", value_name="w")
    y = fn.emit("linear", x, w, value_name="y")
    r = fn.emit("add", y, x, value_name="r")
    ln = fn.emit("layer_norm", r, fn.emit("weight", name="ln.weight"), fn.emit("weight", name="ln.bias"),
                 eps=1e-5, value_name="ln")
    sl = fn.emit("slice", ln, axis=1, end=seq - 1, value_name="sl")
    fn.set_results([fn.emit("softmax", sl, value_name="out")])
    other = module.add_function("other")
    ids = other.add_param("ids", TensorType("i64", (batch,)))
    other.set_results([other.emit("embedding", other.emit("weight", name="table"), ids, value_name="e")])
    verify_module(module)
    return module


def node(module, name):
    for fn in module.functions.values():
        for n in fn.nodes:
            if any(v.name == name for v in n.outputs):
                return n
    raise KeyError(name)


def value(module, name):
    for fn in module.functions.values():
        for v in fn.values():
            if v.name == name:
                return v
    raise KeyError(name)


def expect(module, *fragments):
    with pytest.raises(VerificationError) as info:
        verify_module(module)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, text
    assert "\n" not in text
    return text


def test_valid_modules_pass():
    module = build()
    verify_module(module)
    for fn in module.functions.values():
        verify_function(fn)
    # a module edited through the API stays valid
    fn = module.functions["main"]
    y, r = value(module, "y"), value(module, "r")
    neg = fn.emit("neg", y, value_name="neg", insert_before=node(module, "r"))
    fn.replace_all_uses(y, neg)
    node(module, "neg").set_input(0, y)  # replace_all_uses also rewired neg's own input
    assert node(module, "r").inputs[0] is neg and node(module, "neg").inputs[0] is y
    verify_module(module)
    fn.replace_all_uses(neg, y)
    fn.erase(node(module, "neg"))
    verify_module(module)
    assert [n.op for n in r.users] == ["layer_norm"]


# 1. SSA ------------------------------------------------------------------------------
def test_use_before_definition():
    module = build()
    fn = module.functions["main"]
    i, j = fn.nodes.index(node(module, "y")), fn.nodes.index(node(module, "r"))
    fn.nodes[i], fn.nodes[j] = fn.nodes[j], fn.nodes[i]
    expect(module, "@main", "add(%y, %x)", "input 0 %y is not defined before use")


def test_value_from_another_function():
    module = build()
    foreign = module.functions["other"].params[0]
    n = node(module, "r")
    n.set_input(1, foreign)  # keeps use lists right; the value is still not defined in @main
    expect(module, "@main", "input 1 %ids is not defined before use")


def test_value_of_an_erased_node():
    module = build()
    fn = module.functions["main"]
    fn.nodes.remove(node(module, "y"))  # dropped without erase(): its output is still read
    expect(module, "@main", "%y is not defined before use")


def test_node_listed_twice():
    module = build()
    fn = module.functions["main"]
    fn.nodes.append(node(module, "out"))
    expect(module, "@main", "defined twice")


def test_two_values_with_one_name():
    module = build()
    value(module, "r").name = "y"
    expect(module, "@main", "name %y used for two values")


def test_parameter_with_producer():
    module = build()
    module.functions["main"].params[0].producer = node(module, "y")
    expect(module, "@main", "parameter %x has a producer")


def test_output_not_pointing_back():
    module = build()
    value(module, "r").producer = node(module, "y")
    expect(module, "@main", "output 0 does not point back to its node")
    module = build()
    value(module, "r").index = 1
    expect(module, "@main", "output 0 does not point back")


def test_node_belonging_to_another_function():
    module = build()
    node(module, "r").function = module.functions["other"]
    expect(module, "@main", "node belongs to another function")


def test_function_not_pointing_to_its_module():
    module = build()
    module.functions["other"].module = Module()
    expect(module, "@other", "does not point back to its module")


# 2. use lists ----------------------------------------------------------------------------
def test_stale_use_entry():
    module = build()
    y = value(module, "y")
    y.uses.append((node(module, "sl"), 0))  # sl reads %ln, not %y
    expect(module, "@main", "%y's use list is stale", "slice input 0")


def test_use_entry_with_bad_position():
    module = build()
    y = value(module, "y")
    y.uses.append((node(module, "r"), 5))
    expect(module, "@main", "%y's use list is stale")


def test_missing_use_entry():
    module = build()
    x = module.functions["main"].params[0]
    x.uses = [(n, p) for n, p in x.uses if n is not node(module, "r")]
    expect(module, "@main", "add(%y, %x)", "%x's use list misses this node")


def test_duplicated_use_entry():
    module = build()
    y = value(module, "y")
    y.uses.append(y.uses[0])
    expect(module, "@main", "%y's use list")


def test_use_by_node_outside_the_function():
    module = build()
    other = module.functions["other"]
    stray = node(module, "e")
    value(module, "y").uses.append((stray, 0))
    expect(module, "@main", "%y is used by a node outside the function")
    module = build()
    fn = module.functions["main"]
    out = node(module, "out")
    fn.nodes.remove(out)  # removed without dropping its inputs, and no longer a result
    fn.set_results([value(module, "sl")])
    expect(module, "@main", "%sl is used by a node outside the function")
    assert other  # the other function is untouched


# 3. ops and attributes ---------------------------------------------------------------------
def test_unknown_op():
    module = build()
    node(module, "r").op = "fused_magic"
    expect(module, "@main", "unknown op 'fused_magic'")


def test_unknown_attribute():
    module = build()
    node(module, "r").attrs["alpha"] = 2
    expect(module, "@main", "attributes ['alpha'] differ from the op's []")


def test_missing_attribute():
    module = build()
    del node(module, "sl").attrs["step"]
    expect(module, "@main",
           "attributes ['axis', 'end', 'start'] differ from the op's ['axis', 'end', 'start', 'step']")


def test_wrong_input_count():
    module = build()
    n = node(module, "r")
    x = module.functions["main"].params[0]
    n._append_input(x)
    expect(module, "@main", "op add: expected 2 inputs, found 3")


def test_bad_attribute_value():
    module = build()
    node(module, "sl").attrs["end"] = seq + 1
    expect(module, "@main", "op slice", "start <= end <= dim")


# 4. types ------------------------------------------------------------------------------------
def test_wrong_recorded_output_type():
    module = build()
    value(module, "r").type = TensorType("f32", (batch, seq, 9))
    expect(module, "@main", "output types expected f32[batch, seq, 8], found f32[batch, seq, 9]")


def test_wrong_recorded_dtype():
    module = build()
    value(module, "out").type = TensorType("f16", (batch, seq - 1, 8))
    expect(module, "@main", "expected f32[batch, seq - 1, 8], found f16[batch, seq - 1, 8]")


def test_wrong_output_count():
    module = build()
    n = node(module, "out")
    from kiln.ir.graph import Value

    extra = Value("extra", n.outputs[0].type, n, 1)
    n.outputs.append(extra)
    expect(module, "@main", "output types expected")


def test_parameter_type_change_breaks_downstream():
    module = build()
    module.functions["main"].params[0].type = TensorType("f32", (batch, seq, 4))
    expect(module, "@main", "op linear")


# 5. results ----------------------------------------------------------------------------------
def test_result_not_defined():
    module = build()
    module.functions["main"].results = [module.functions["other"].results[0]]
    expect(module, "@main", "result %e is not defined in the function")


def test_no_results():
    module = build()
    module.functions["main"].results = []
    expect(module, "@main", "returns nothing")


# 6. weights ----------------------------------------------------------------------------------
def test_weight_array_dtype_mismatch():
    module = build()
    module.weight_data["ln.weight"] = np.ones(8, np.float16)
    expect(module, "weight 'ln.weight'", "declared f32[8]", "f16[8]")


def test_weight_array_shape_mismatch():
    module = build()
    module.weight_data["fc.weight"] = np.ones((8, 4), np.float32)
    expect(module, "weight 'fc.weight'", "declared f32[8, 8]", "[8, 4]")


def test_weight_array_of_unsupported_dtype():
    module = build()
    module.weight_data["ln.bias"] = np.zeros(8, np.complex64)
    expect(module, "weight 'ln.bias'", "complex64")


def test_weight_array_without_declaration():
    module = build()
    module.weight_data["stray.weight"] = np.zeros(3, np.float32)
    expect(module, "'stray.weight'", "not declared")


def test_unknown_weight_name():
    module = build()
    node(module, "w").attrs["name"] = "fc.wieght"
    expect(module, "@main", "no weight named 'fc.wieght'")


def test_removed_weight_still_used():
    module = build()
    module.remove_weight("table")
    expect(module, "@other", "no weight named 'table'")


def test_weight_type_changed_under_its_node():
    module = build()
    module.weights["fc.weight"] = TensorType("f32", (8, 4))
    module.weight_data.pop("fc.weight")
    expect(module, "@main", "weight() {name=\"fc.weight\"}", "output types expected f32[8, 4], found f32[8, 8]")


# 7. symbols -----------------------------------------------------------------------------------
def test_free_symbol_in_attribute():
    module = build()
    fn = module.functions["main"]
    extra = fn.emit("full", shape=(sym("heads"), 4), value=0.0, dtype="f32")
    fn.set_results(fn.results + [extra])
    expect(module, "@main", "symbols ['heads'] are not bound by the parameters of @main")


def test_free_symbol_in_type():
    module = build()
    fn = module.functions["other"]
    fn.params[0].type = TensorType("i64", (batch,))
    fn.nodes[1].outputs[0].type = TensorType("f16", (sym("tokens"), 8))
    text = expect(module, "@other")
    assert "tokens" in text


def test_symbols_bound_by_any_parameter():
    module = build()
    fn = module.functions["main"]
    fn.add_param("pos", TensorType("i64", (sym("cache_len"),)))
    extra = fn.emit("arange", end=sym("cache_len") + seq)
    fn.set_results(fn.results + [extra])
    verify_module(module)


# 7. symbol ranges --------------------------------------------------------------------------------
@pytest.mark.parametrize("declared,message", [((0, 4), "need 1 <= least <= greatest"),
                                              ((4, 2), "need 1 <= least <= greatest"),
                                              ((1, 4.0), "must be integers"), ((1,), "")])
def test_bad_symbol_range(declared, message):
    module = build()
    module.symbol_ranges["seq"] = declared  # planted past declare_range, which checks
    expect(module, "declared range of symbol 'seq'", message)
