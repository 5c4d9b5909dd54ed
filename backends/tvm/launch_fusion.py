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

The merged function takes one parameter per distinct piece of memory, not one per kernel parameter. A
tensor passed to two kernels, or two views of one tensor (a reshape, a layer's pages of the KV pool), reach
it once; inside, each kernel's parameter is declared as a buffer over that memory at its element offset.
The parameters then never alias, so the merged function is ``noalias`` like any kernel. This is required,
not tidiness: TVM 0.27's LLVM codegen compiles every function of a module with the ``tirx.noalias`` of the
function declared last (``is_restricted_`` is set while declaring, and all functions are declared before
any is defined, in ``CodeGenLLVM::AddFunctionsOrdered``), so a ``tirx.noalias: False`` on one function is
ignored. With aliasing parameters marked ``noalias``, LLVM moved a QK-norm's loads above the split that
wrote them (a tiny Qwen3-MoE decoded wrong, with any number of threads). A run whose views cannot be
expressed this way (a symbolic root shape, a view that changes the dtype, a view at a symbolic offset beside
another view of its root, an offset a kernel's fixed ``elem_offset`` cannot take) is left unmerged.

The bindings between the calls (allocations, views, tuples) move before the merged call: in
destination-passing form they only name memory, and the memory planner sees every buffer of the run live
at that one call.
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


def _alias_layout(calls, resolve):
    """How a run's kernel arguments share memory: (pattern, groups), or None when some sharing cannot be
    expressed. ``resolve(var)`` gives (root var, byte offset) of a Relax tensor through its reshapes and
    views. ``groups`` holds, per distinct piece of memory in order of first use, (the Relax var the merged
    function takes for it, its [(call, argument, element offset)], and None when that var is one of the
    arguments, else the root's (shape, dtype) for a new parameter). ``pattern`` identifies the layout
    (merged functions are cached by it)."""
    roots = []  # [(root var, [(call, argument, arg var, byte offset)])]
    for number, call in enumerate(calls):
        for position, arg in enumerate(call.args):
            root, offset = resolve(arg)
            for known, members in roots:
                if known.same_as(root):
                    members.append((number, position, arg, offset))
                    break
            else:
                roots.append((root, [(number, position, arg, offset)]))
    groups, pattern = [], []
    for root, members in roots:
        dtypes = {str(arg.ty.dtype) for _, _, arg, _ in members}
        if len(dtypes) != 1:  # a view that reinterprets the dtype
            return None
        itemsize = _itemsize(dtypes.pop())
        first = members[0][2]
        if all(arg.same_as(first) for _, _, arg, _ in members):
            # one tensor, passed to several kernels: it is the parameter, each kernel's at its start
            new, var = None, first
            placed = [(number, position, 0) for number, position, _, _ in members]
        else:
            shape = _static_shape(root)
            if shape is None or str(root.ty.dtype) != str(first.ty.dtype) or \
                    any(offset is None or offset % itemsize for _, _, _, offset in members):
                return None
            new, var = (shape, str(root.ty.dtype)), root
            placed = [(number, position, offset // itemsize) for number, position, _, offset in members]
        groups.append((var, placed, new))
        pattern.append((tuple(placed), new is not None))
    return tuple(pattern), groups


def _itemsize(dtype: str) -> int:
    bits = int("".join(ch for ch in dtype if ch.isdigit()) or 8)
    return max(bits // 8, 1)


def _declare_over(param, base, offset: int, prologue) -> bool:
    """Declares the kernel parameter ``param`` as a buffer over ``base``'s memory at ``offset`` elements past
    ``base``'s own offset: a Bind of its symbolic ``elem_offset`` (if it has one) and a DeclBuffer, appended to
    ``prologue``. False when its fixed ``elem_offset`` or ``offset_factor`` cannot take that offset."""
    import tvm
    from tvm import tirx

    want = base.ty.elem_offset + offset if offset else base.ty.elem_offset
    have = param.ty.elem_offset
    if isinstance(have, tirx.IntImm):
        want = tvm.sym.Analyzer().simplify(want)
        if not (isinstance(want, tirx.IntImm) and want.value == have.value):
            return False
    else:
        factor = int(param.ty.offset_factor)
        base_factor = int(base.ty.offset_factor)
        base_offset = base.ty.elem_offset
        base_aligned = (base_offset.value % factor == 0 if isinstance(base_offset, tirx.IntImm)
                        else base_factor % factor == 0)
        if factor > 1 and (offset % factor or not base_aligned):
            return False
        if want.ty != have.ty:
            want = tirx.Cast(str(have.ty.dtype), want)
        prologue.append(tirx.Bind(have, want))
    prologue.append(tirx.DeclBuffer(param, data=base.data))
    return True


def _merge(funcs_and_kinds, groups):
    """One PrimFunc running ``funcs_and_kinds`` [(PrimFunc, kind)] in order inside one parallel launch, with
    one parameter per group of ``_alias_layout``; None when a kernel's parameter cannot sit over its group's
    memory."""
    from tvm import s_tir, tirx

    funcs = [s_tir.renew_defs(func) for func, _ in funcs_and_kinds]  # a kernel called twice: new variables
    params, prologue = [], []
    for _, placed, new in groups:
        if new is None:
            number, position, _ = placed[0]
            base = funcs[number].params[position]
            rest = placed[1:]
        else:
            shape, dtype = new
            base = tirx.decl_buffer([tirx.IntImm("int64", dim) for dim in shape], dtype, "memory")
            rest = placed
        params.append(base)
        for number, position, offset in rest:
            if not _declare_over(funcs[number].params[position], base, offset, prologue):
                return None

    stages, serial = [], []

    def flush_serial():
        if serial:
            body = serial[0] if len(serial) == 1 else tirx.SeqStmt(list(serial))
            # two iterations, not one: TIR's simplifier removes a one-iteration loop, parallel or not
            task = tirx.Var("task", "int32")
            stages.append(tirx.For(task, 0, 2, tirx.ForKind.PARALLEL, tirx.IfThenElse(task == 0, body, None)))
            serial.clear()

    for func, (_, kind) in zip(funcs, funcs_and_kinds):
        if kind == "serial":
            serial.append(func.body)
        else:
            flush_serial()
            stages.append(func.body)
    flush_serial()
    body = [tirx.AttrStmt(tirx.IntImm("int32", 0), BARRIER_AFTER, 1, stage) for stage in stages[:-1]] + stages[-1:]
    launch = tirx.AttrStmt(tirx.IntImm("int32", 0), PARALLEL_LAUNCH_POINT, 1,
                           body[0] if len(body) == 1 else tirx.SeqStmt(body))
    return tirx.PrimFunc(params, tirx.SeqStmt(prologue + [launch]) if prologue else launch).with_attrs(
        {"tirx.noalias": True, "tirx.is_scheduled": True, "kiln.merged_kernels": len(funcs_and_kinds)})


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

        definitions = {}  # a Relax var -> the value bound to it (views and reshapes are followed to their root)

        def resolve(var):
            """(root var, byte offset) of the tensor ``var`` through its reshapes, views and aliases; the offset
            is None past a view at a symbolic offset."""
            offset = 0
            while True:
                value = definitions.get(var)
                if isinstance(value, relax.Var):
                    var = value
                elif isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and \
                        value.op.name == "relax.reshape":
                    var = value.args[0]
                elif isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and \
                        value.op.name == "relax.memory.view" and isinstance(value.args[0], relax.Var):
                    extra = value.args[3] if len(value.args) > 3 else None
                    extra = getattr(extra, "value", extra)
                    if extra is not None and not isinstance(extra, (int, tirx.IntImm)):
                        offset = None  # somewhere in its root: only the very same view can share the root
                    elif offset is not None:
                        offset += int(extra or 0)
                    var = value.args[0]
                else:
                    return var, offset

        merged = {}  # (kernel, argument shapes) per call, and how they share memory -> the merged GlobalVar

        def merged_call(run):
            """The bindings replacing ``run``: one call of the merged kernel, or ``run`` itself when its
            arguments share memory in a way the merged function cannot express."""
            calls = [binding.value for binding in run]
            if len(calls) == 1:
                return list(run)
            layout = _alias_layout(calls, resolve)
            if layout is None:
                return list(run)
            pattern, groups = layout
            key = (tuple(call_key(call) for call in calls), pattern)
            if key not in merged:
                func = _merge([kernels[call_key(call)] for call in calls], groups)
                merged[key] = None if func is None else builder.add_func(func, f"kiln_launch{len(merged)}")
            if merged[key] is None:
                return list(run)
            args = [var for var, _, _ in groups]
            return [relax.VarBinding(relax.Var("_", run[0].var.ty),
                                     relax.Call(merged[key], args, None, calls[0].ty_args))]

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
                    bindings.extend(merged_call(run))
                    run, chunk = [], chunk_of[position]
                bindings.extend(pending)
                pending = []
                run.append(binding)
                position += 1
            bindings.extend(merged_call(run))
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
            definitions.clear()
            definitions.update({binding.var: binding.value for block in body.blocks for binding in block.bindings
                                if isinstance(binding, relax.VarBinding)})
            new_body = relax.SeqExpr([rewrite_block(block) for block in body.blocks], body.body)
            updates[gvar] = relax.Function(func.params, new_body, func.ret_ty, func.is_pure, func.attrs, func.span)
        for gvar, func in updates.items():
            builder.update_func(gvar, func)
        return relax.transform.Normalize()(builder.get())

    return _pass
