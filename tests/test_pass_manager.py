"""The pass manager: verification around passes, timing, print/stop-after, fixed points, failure reports."""

import pytest

from kiln.ir.errors import KilnError
from kiln.ir.parser import parse_module
from kiln.passes import PASSES, PassManager, register_pass
from kiln.passes.manager import PassError

TEXT = """module {
  func @f(%x: f32[batch, 4]) -> (f32[batch, 4]) {
    %0 = constant() {value=0.0, dtype="f32"} : f32[]
    %1 = add(%x, %0) : f32[batch, 4]
    %2 = neg(%x) : f32[batch, 4]
    return %1
  }
}
"""


def _module():
    return parse_module(TEXT)


@pytest.fixture(scope="module", autouse=True)
def test_passes():
    calls = {"count": 0}

    @register_pass("test_break_types")
    def break_types(module, options):
        """Rewrites nothing; corrupts a recorded type (to test verification)."""
        from kiln.ir.types import TensorType

        node = module.functions["f"].nodes[1]
        node.outputs[0].type = TensorType("f16", node.outputs[0].type.shape)
        return True

    @register_pass("test_count_down")
    def count_down(module, options):
        """Rewrites nothing; reports a change three times (to test fixed points)."""
        calls["count"] += 1
        return calls["count"] <= 3

    @register_pass("test_sleep")
    def sleep(module, options):
        """Rewrites nothing; takes at least 20 ms (to test timing)."""
        import time

        time.sleep(0.02)
        return False

    @register_pass("test_raise")
    def raise_error(module, options):
        """Rewrites nothing; fails."""
        raise ValueError("boom")

    yield calls
    for name in ("test_break_types", "test_count_down", "test_sleep", "test_raise"):
        PASSES.pop(name)


def test_runs_times_and_records_changes():
    module = _module()
    manager = PassManager([("fold_constants", "eliminate_dead_code")])
    manager.run(module)
    names = [r.name for r in manager.records]
    assert names[:2] == ["fold_constants", "eliminate_dead_code"]
    assert manager.records[0].modified and manager.records[1].modified  # x + 0 -> x, then the dead neg/add go
    assert [n.op for n in module.functions["f"].nodes] == []


def test_each_pass_is_timed():
    """A pass that sleeps 20 ms is recorded as taking at least that, and all passes together no longer than
    the run (a lower and an upper bound, not a speed)."""
    import time

    manager = PassManager(["fold_constants", "test_sleep", "eliminate_dead_code"])
    start = time.perf_counter()
    manager.run(_module())
    elapsed_ms = (time.perf_counter() - start) * 1000
    times = {r.name: r.milliseconds for r in manager.records}
    assert list(times) == ["fold_constants", "test_sleep", "eliminate_dead_code"]
    assert times["test_sleep"] >= 20
    assert sum(times.values()) <= elapsed_ms


def test_fixed_point_group_repeats_until_nothing_changes(test_passes):
    test_passes["count"] = 0
    manager = PassManager([("test_count_down",)])
    manager.run(_module())
    assert [r.modified for r in manager.records] == [True, True, True, False]


def test_verification_after_a_pass_names_it_and_its_predecessors():
    manager = PassManager(["eliminate_common_subexpressions", "test_break_types"])
    with pytest.raises(PassError) as info:
        manager.run(_module())
    message = str(info.value)
    assert "after pass test_break_types" in message and "eliminate_common_subexpressions" in message
    assert "output types expected f32[batch, 4], found f16[batch, 4]" in message


def test_a_failing_pass_is_reported_with_its_name():
    with pytest.raises(PassError, match=r"pass test_raise failed: ValueError: boom \(after eliminate_dead_code\)"):
        PassManager(["eliminate_dead_code", "test_raise"]).run(_module())


def test_print_after_and_stop_after():
    printed = []
    manager = PassManager(["fold_constants", "eliminate_dead_code"], print_after="fold_constants",
                          stop_after="fold_constants", printer=printed.append)
    module = manager.run(_module())
    assert len(printed) == 1 and printed[0].startswith("// IR after fold_constants")
    assert [r.name for r in manager.records] == ["fold_constants"]
    assert any(n.op == "neg" for n in module.functions["f"].nodes)  # dead code pass never ran


def test_unknown_pass_names_are_refused():
    with pytest.raises(KilnError, match="unknown pass 'nope'"):
        PassManager(["nope"])
    with pytest.raises(KilnError, match="--stop-after 'fuse_rope' is not in the pipeline"):
        PassManager(["eliminate_dead_code"], stop_after="fuse_rope")


def test_every_registered_pass_says_what_it_rewrites():
    for name, info in PASSES.items():
        if not name.startswith("test_"):
            assert info.summary, name
