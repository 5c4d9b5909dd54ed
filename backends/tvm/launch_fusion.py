"""One thread-pool launch for a run of kernels: a Relax module pass for the CPU pipeline.

A decode step of a small model is hundreds of tiny kernels; each parallel one wakes TVM's thread pool
(1.2 us on a quiet machine, 7.6 us with another process running) and each call of any kernel costs the VM
a dispatch. After the dataflow is lowered (kernels are destination-passing calls, buffers explicit
``alloc_tensor`` bindings), this pass merges each run of consecutive kernel calls into one PrimFunc whose
body is one ``pragma_parallel_launch_point``: every stage runs inside a single launch, with a
``TVMBackendParallelBarrier`` between stages (LLVM's CPU codegen: ``codegen_cpu.cc``).

- A stage whose kernel has one parallel loop at its top splits that loop over the pool's tasks, as a
  launch of its own would (static chunks).
- Kernels without a parallel loop (norms, RoPE, residual adds, the cache append) run on task 0 only,
  consecutive ones together, as iteration 0 of a two-iteration parallel loop whose iteration 1 does nothing:
  code outside a parallel loop would run on every task, and a one-iteration loop is simplified away.
- A kernel of another shape (a parallel loop under a serial one, two parallel loops) ends the run and is
  called as it is.

The merged function takes every kernel's parameters in order (a tensor passed to two kernels is passed
twice), so no buffer is renamed inside a kernel; since views of one tensor then reach it as different
parameters, the merged function is not ``noalias``. The bindings between the calls (allocations, views,
tuples) move before the merged call: in destination-passing form they only name memory, and the memory
planner sees every buffer of the run live at that one call.

Off by default (``KILN_FUSE_LAUNCHES=1`` turns it on): a tiny Qwen3-MoE's decode comes out wrong with it,
deterministically and with one thread, while the same merged kernels run right when concatenated without
the launch point; that is not understood yet.
"""

from __future__ import annotations


PARALLEL_LAUNCH_POINT = "pragma_parallel_launch_point"
BARRIER_AFTER = "pragma_parallel_barrier_when_finish"
MAX_KERNELS = 24  # kernels per merged launch: about one transformer layer; bounds the size of one LLVM function
_SETUP_OPS = ("relax.builtin.alloc_tensor", "relax.reshape", "relax.memory.view")


def _visit(stmt, found) -> None:
    """post_order_visit for TVM builds whose tirx exposes no stmt_functor: walks the statement types
    kernels use (the visitor only needs to find parallel loops and what holds them)."""
    from tvm import s_tir, tirx

    stack = [stmt]
    while stack:
        node = stack.pop()
        if isinstance(node, tirx.For):
            if node.kind == tirx.ForKind.PARALLEL:
                found.append(node)
            stack.append(node.body)
        elif isinstance(node, tirx.SeqStmt):
            stack.extend(node.seq)
        elif isinstance(node, s_tir.SBlockRealize):
            stack.append(node.block)
        elif isinstance(node, s_tir.SBlock):
            stack.append(node.body)
            if node.init is not None:
                stack.append(node.init)
        elif hasattr(node, "body") and isinstance(getattr(node, "body"), tirx.Stmt):
            stack.append(node.body)
        elif isinstance(node, tirx.IfThenElse):
            stack.append(node.then_case)
            if node.else_case is not None:
                stack.append(node.else_case)


def _top_parallel_loop(stmt):
    """The kernel's one parallel loop if it sits at the top of the body (under only the root block and
    buffer allocations, declarations and bindings, so everything around it is per-task setup); None if it
    has no parallel loop; raises ValueError for any other shape."""
    from tvm import s_tir, tirx

    loops = []
    _visit(stmt, loops)
    if not loops:
        return None
    if len(loops) > 1:
        raise ValueError("more than one parallel loop")
    node = stmt
    while True:
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL:
            return node
        if isinstance(node, s_tir.SBlockRealize):
            node = node.block
        elif isinstance(node, s_tir.SBlock):
            if node.init is not None:
                raise ValueError("a block init above the parallel loop")
            node = node.body
        elif isinstance(node, tirx.SeqStmt):
            rest = [item for item in node.seq if not isinstance(item, (tirx.AllocBuffer, tirx.DeclBuffer, tirx.Bind))]
            if len(rest) != 1:
                raise ValueError("statements beside the parallel loop")
            node = rest[0]
        else:
            raise ValueError(f"a parallel loop under {type(node).__name__}")


def _kernel_kind(func) -> str | None:
    """"parallel", "serial", or None when the kernel cannot join a merged launch. A parallel loop of one
    iteration makes the kernel serial: TIR's simplifier removes such a loop, which would leave its body to
    every task (run as a serial stage, its body runs on task 0, and its loop is still removed)."""
    import tvm
    from tvm import tirx

    if not all(isinstance(param.ty, tirx.BufferType) for param in func.params):  # a scalar parameter
        return None
    try:
        loop = _top_parallel_loop(func.body)
    except ValueError:
        return None
    if loop is None:
        return "serial"
    extent = tvm.sym.Analyzer().simplify(loop.extent)
    return "serial" if isinstance(extent, tirx.IntImm) and extent.value < 2 else "parallel"


def _static_shape(arg):
    """The Relax tensor ``arg``'s shape as ints, or None if any dimension is symbolic."""
    from tvm import tirx

    shape = getattr(arg.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(dim, tirx.IntImm) for dim in values):
        return None
    return [int(dim) for dim in values]


def _specialized(func, args):
    """``func`` with its symbolic buffer sizes fixed to those of the call's Relax ``args`` (a decode step's
    shapes are static), or None when an argument's shape is symbolic."""
    from tvm import tirx

    for index in range(len(func.params)):
        param = func.params[index]
        if all(isinstance(dim, tirx.IntImm) for dim in param.ty.shape):
            continue
        shape = _static_shape(args[index])
        if shape is None or len(shape) != len(param.ty.shape):
            return None
        buffer = tirx.decl_buffer([tirx.IntImm(dim.ty.dtype, value) for dim, value in zip(param.ty.shape, shape)],
                                  param.ty.dtype, param.name, elem_offset=param.ty.elem_offset,
                                  data_alignment=param.ty.data_alignment, offset_factor=param.ty.offset_factor)
        func = func.specialize({param: buffer})
    return func


def _merge(funcs_and_kinds):
    """One PrimFunc running ``funcs_and_kinds`` [(PrimFunc, kind)] in order inside one parallel launch."""
    from tvm import s_tir, tirx

    params, stages, serial = [], [], []

    def flush_serial():
        if serial:
            body = serial[0] if len(serial) == 1 else tirx.SeqStmt(list(serial))
            # two iterations, not one: TIR's simplifier removes a one-iteration loop, parallel or not
            task = tirx.Var("task", "int32")
            stages.append(tirx.For(task, 0, 2, tirx.ForKind.PARALLEL, tirx.IfThenElse(task == 0, body, None)))
            serial.clear()

    for func, kind in funcs_and_kinds:
        func = s_tir.renew_defs(func)  # a kernel called twice gets its own variables each time
        params.extend(func.params)
        if kind == "serial":
            serial.append(func.body)
        else:
            flush_serial()
            stages.append(func.body)
    flush_serial()
    body = [tirx.AttrStmt(tirx.IntImm("int32", 0), BARRIER_AFTER, 1, stage) for stage in stages[:-1]] + stages[-1:]
    launch = tirx.AttrStmt(tirx.IntImm("int32", 0), PARALLEL_LAUNCH_POINT, 1,
                           body[0] if len(body) == 1 else tirx.SeqStmt(body))
    return tirx.PrimFunc(params, launch).with_attrs(
        {"tirx.noalias": False, "tirx.is_scheduled": True, "kiln.merged_kernels": len(funcs_and_kinds)})


def _chunks(begin: int, end: int, max_kernels: int) -> list[int]:
    """Cut points splitting [begin, end) into the fewest nearly equal chunks of at most ``max_kernels``."""
    count = -(-(end - begin) // max_kernels)
    return [begin + (end - begin) * number // count for number in range(count)]


def _cut_points(kernels: list, max_kernels: int) -> list[int]:
    """Where to split a run of kernel calls into launches: at the repeat of its period (a transformer layer),
    so that every layer's launch is the same merged function, compiled once. Returns the boundaries, from 0
    to len(kernels)."""
    n = len(kernels)
    # The period: the shift under which most calls call the same kernel (a layer repeats exactly).
    best, period = 0, None
    for shift in range(2, n // 2 + 1):
        matches = sum(kernels[i] == kernels[i + shift] for i in range(n - shift))
        if matches > best:
            best, period = matches, shift
    start = None
    if period is not None:
        start = next((i for i in range(n - 2 * period + 1)
                      if kernels[i:i + period] == kernels[i + period:i + 2 * period]), None)
    if start is None:
        return _chunks(0, n, max_kernels) + [n]
    cuts = _chunks(0, start, max_kernels) if start else []
    position = start
    while position + period <= n and kernels[position:position + period] == kernels[start:start + period]:
        cuts += _chunks(position, position + period, max_kernels)
        position += period
    if position < n:
        cuts += _chunks(position, n, max_kernels)
    return cuts + [n]


def fuse_launches(function_names=None, max_kernels: int = MAX_KERNELS):
    """A module pass merging runs of kernel calls in the Relax functions ``function_names`` (all when None)
    into one launch each (see the module's docstring). Runs after the dataflow is lowered."""
    import tvm
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="kiln.FuseLaunches")
    def _pass(mod, _ctx):
        kernels = {}  # (kernel, argument shapes) -> (the kernel specialized to them, its kind) or None

        def call_key(call):
            shapes = tuple(_static_shape(arg) for arg in call.args)
            return None if None in shapes else (call.op, tuple(tuple(shape) for shape in shapes))

        def kind_of(call):
            """The call's kernel kind when it can join a merged launch, else None."""
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.GlobalVar)):
                return None
            func = mod[call.op]
            if not isinstance(func, tirx.PrimFunc) or len(func.params) != len(call.args) or not all(
                    isinstance(arg, relax.Var) for arg in call.args):
                return None
            key = call_key(call)
            if key is None:  # a symbolic shape: a prefill's kernels, which launch_fusion leaves alone
                return None
            if key not in kernels:
                specialized = _specialized(func, call.args)
                kind = _kernel_kind(specialized) if specialized is not None else None
                kernels[key] = None if kind is None else (specialized, kind)
            return None if kernels[key] is None else kernels[key][1]

        def is_setup(value):
            if isinstance(value, (relax.Var, relax.Tuple, relax.TupleGetItem)):
                return True
            return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in _SETUP_OPS

        merged = {}  # (kernel, argument shapes) per call -> the merged PrimFunc's GlobalVar

        def merged_call(run):
            calls = [binding.value for binding in run]
            if len(calls) == 1:
                return run[0]
            key = tuple(call_key(call) for call in calls)
            if key not in merged:
                func = _merge([kernels[call_key(call)] for call in calls])
                merged[key] = builder.add_func(func, f"kiln_launch{len(merged)}")
            args = [arg for call in calls for arg in call.args]
            return relax.VarBinding(relax.Var("_", run[0].var.ty),
                                    relax.Call(merged[key], args, None, calls[0].ty_args))

        def emit_segment(bindings, segment):
            """A run of kernel calls and the setup bindings between them: each setup binding moves before the
            merged call holding the next kernel call after it."""
            calls = [binding for binding, is_call in segment if is_call]
            cuts = _cut_points([binding.value.op.name_hint for binding in calls], max_kernels)
            chunk_of = {}
            for number, (begin, end) in enumerate(zip(cuts, cuts[1:])):
                for position in range(begin, end):
                    chunk_of[position] = number
            pending, run, position, chunk = [], [], 0, 0
            for binding, is_call in segment:
                if not is_call:
                    pending.append(binding)
                    continue
                if chunk_of[position] != chunk:
                    bindings.append(merged_call(run))
                    run, chunk = [], chunk_of[position]
                bindings.extend(pending)
                pending = []
                run.append(binding)
                position += 1
            bindings.append(merged_call(run))
            bindings.extend(pending)

        def rewrite_block(block):
            bindings, segment = [], []
            for binding in block.bindings:
                value = binding.value if isinstance(binding, relax.VarBinding) else None
                if value is not None and kind_of(value) is not None:
                    segment.append((binding, True))
                elif value is not None and is_setup(value) and segment:
                    segment.append((binding, False))
                else:
                    if segment:
                        emit_segment(bindings, segment)
                        segment = []
                    bindings.append(binding)
            if segment:
                emit_segment(bindings, segment)
            return relax.BindingBlock(bindings)

        builder = relax.BlockBuilder(mod)
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function) or (function_names is not None and
                                                        gvar.name_hint not in function_names):
                continue
            body = func.body
            if not isinstance(body, relax.SeqExpr) or any(isinstance(b, relax.DataflowBlock) for b in body.blocks):
                continue
            new_body = relax.SeqExpr([rewrite_block(block) for block in body.blocks], body.body)
            updates[gvar] = relax.Function(func.params, new_body, func.ret_ty, func.is_pure, func.attrs, func.span)
        for gvar, func in updates.items():
            builder.update_func(gvar, func)
        return relax.transform.Normalize()(builder.get())

    return _pass
