"""Execution side of the ONNX Runtime backend: prefill/decode sessions over per-layer K/V buffers.

Imports only numpy and onnxruntime. kiln's runtime speaks a paged cache (a page table per
batch row); GroupQueryAttention wants each sequence contiguous, in one row of a
``[slots, kv_heads, max_seq_len, head_dim]`` buffer per layer and K/V. A sequence is known by
its first page: a call at position 0 gives it a slot, later calls find the slot through that
page. A batch whose slots are consecutive and in row order runs on a view of the buffers
(IO binding with a pointer into them, the same memory as past and present, no copy); any other
batch first swaps slot contents so that it becomes one (rare: a batch keeps its slots afterwards).
"""

from __future__ import annotations

import os

import numpy as np

from kiln.ir.errors import ArtifactError, ConfigError

_NUMPY = {"f32": np.float32, "f16": np.float16}
_FEEDS = ("input_ids", "positions", "seqlens_k", "total_sequence_length")


class SlotTable:
    """Which buffer row (slot) holds which sequence, and how many tokens of it are cached."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.page_of = [-1] * num_slots  # first page of the sequence in each slot, -1 when free
        self.length = [0] * num_slots
        self.last_used = [0] * num_slots
        self.clock = 0

    def find(self, first_page: int) -> int | None:
        try:
            return self.page_of.index(first_page)
        except ValueError:
            return None

    def claim(self, first_page: int, busy: set) -> int:
        """A slot for a new sequence starting at ``first_page``: its old slot (the page was freed and reused),
        a free one, or the least recently used slot outside the batch."""
        slot = self.find(first_page)
        if slot is None:
            free = [s for s in range(self.num_slots) if self.page_of[s] < 0]
            idle = sorted((s for s in range(self.num_slots) if s not in busy), key=lambda s: self.last_used[s])
            if not free and not idle:
                raise ConfigError(f"the ONNX Runtime backend holds {self.num_slots} sequences at once (one KV "
                                  f"buffer row each) and this batch needs more; decode fewer sequences together "
                                  f"or compile with a larger --max-num-seqs")
            slot = free[0] if free else idle[0]
        self.page_of[slot] = first_page
        self.length[slot] = 0
        return slot


class ORTExecutor:
    def __init__(self, info, num_threads: int | None = None, provider: str | None = None,
                 separate_decode: bool = False, spin: bool = False):
        import onnxruntime as ort

        self._ort = ort
        backend = info.manifest["backend_info"]
        _check_backend_info(info)
        target = info.manifest["target"]
        if provider is None:
            provider = "CUDAExecutionProvider" if target == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise ArtifactError(f"{info.path}: compiled for {target}, but this onnxruntime has no {provider} "
                                f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                                f"or recompile with --target cpu")
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        # Idle pool threads spinning between kernels: a little faster on an idle machine, about half the
        # speed when other processes want the cores (measured on a shared 2-core machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # ONNX Runtime prepacks every weight per session (MatMul's packed B, MatMulNBits' blocks) and Python
        # cannot share a prepacked container: each session holds its own copy of the weights. So one model
        # serves generation: prefill_last (or prefill) for the prompt and, with seq = 1, decode too; the
        # all-positions prefill (Engine.logits, perplexity) loads on first use. separate_decode=True runs
        # the lowered decode function as its own session.
        models = backend["models"]
        generation = "prefill_last" if "prefill_last" in models else "prefill"
        self.models = {name: name for name in models}
        self.models["decode"] = "decode" if separate_decode else generation
        # ONNX Runtime opens the models and their external data by path: it reads a private copy whose bytes
        # were hashed as they were written, kept while the executor lives (a session may load later).
        self._copy = info.private_copy([model["file"] for model in models.values()] + [backend["data"]],
                                       "backend_info.models")
        self._files = {name: self._copy.file(model["file"]) for name, model in models.items()}
        self.inputs = {name: model["inputs"] for name, model in models.items()}
        self.logits_rows = {name: model.get("logits_rows") for name, model in models.items()}
        for name, inputs in self.inputs.items():
            unknown = [i for i in inputs if i not in _FEEDS and not i.startswith(("past_key_", "past_value_"))]
            if unknown:
                raise ArtifactError(f"{info.path}: the {name} model takes inputs {unknown} this executor does not "
                                    f"feed (it feeds {', '.join(_FEEDS)} and the KV buffers); recompile it")
        self._options, self._provider = options, provider
        self.sessions: dict = {}
        self.bindings: dict = {}
        for name in {generation, self.models["decode"]}:
            self._session(name)
        self._bound: dict = {}  # model -> (batch, first slot) its KV bindings are for
        self.logits_name = backend["logits"]
        plan = info.manifest["kv_cache"]
        self.max_seq_len = plan["max_seq_len"]
        self.vocab_size = info.manifest["model"]["vocab_size"]
        # Each slot holds a whole max_seq_len sequence: as many as the paged plan's pages allow.
        self.slots = SlotTable(max(1, min(plan["max_num_seqs"], plan["num_pages"] // plan["pages_per_seq"])))
        self.layers = backend["kv_layers"]
        self.buffers = []  # per layer: (K, V) arrays [slots, kv_heads, max_seq_len, head_dim] (CPU) or OrtValues
        for layer in self.layers:
            shape = (self.slots.num_slots, layer["num_kv_heads"], self.max_seq_len, layer["head_dim"])
            dtype = _NUMPY[layer["dtype"]]
            if self.device == "cpu":
                pair = (np.zeros(shape, dtype), np.zeros(shape, dtype))
            else:
                pair = tuple(ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0) for _ in range(2))
            self.buffers.append(pair)

    def _session(self, model: str):
        if model not in self.sessions:
            session = self._ort.InferenceSession(self._files[model], self._options, providers=[self._provider])
            self.sessions[model] = session
            self.bindings[model] = session.io_binding()
        return self.sessions[model], self.bindings[model]

    def has_function(self, name: str) -> bool:
        return name in self.models

    def end_sequence(self, first_page: int) -> None:
        """The sequence whose first page this is has ended: its buffer row is free for the next one."""
        slot = self.slots.find(first_page)
        if slot is not None:
            self.slots.page_of[slot] = -1
            self.slots.length[slot] = 0

    def close(self) -> None:
        self.sessions.clear()
        self.bindings.clear()
        self._copy.close()

    # the buffers -------------------------------------------------------------------
    def _pointer(self, buffer, layer: int, slot: int) -> int:
        base = buffer.ctypes.data if isinstance(buffer, np.ndarray) else buffer.data_ptr()
        info = self.layers[layer]
        per_slot = info["num_kv_heads"] * self.max_seq_len * info["head_dim"] * \
            np.dtype(_NUMPY[info["dtype"]]).itemsize
        return base + slot * per_slot

    def _swap_slots(self, a: int, b: int) -> None:
        """Exchange the cached tokens of slots a and b in every layer (host copies for a GPU buffer)."""
        length = max(self.slots.length[a], self.slots.length[b])
        if length:
            for pair in self.buffers:
                for buffer in pair:
                    if isinstance(buffer, np.ndarray):
                        held = buffer[a, :, :length].copy()
                        buffer[a, :, :length] = buffer[b, :, :length]
                        buffer[b, :, :length] = held
                    else:
                        host = buffer.numpy()
                        host[[a, b]] = host[[b, a]]
                        buffer.update_inplace(host)
        table = self.slots
        for field in (table.page_of, table.length, table.last_used):
            field[a], field[b] = field[b], field[a]

    def _make_consecutive(self, slots: list) -> int:
        """Move the batch's sequences into consecutive slots in row order; returns the first slot."""
        count = len(slots)
        starts = [s - i for i, s in enumerate(slots) if 0 <= s - i <= self.slots.num_slots - count]
        start = max(set(starts), key=starts.count) if starts else 0
        for row in range(count):
            target = start + row
            if slots[row] != target:
                other = slots.index(target) if target in slots else None
                self._swap_slots(slots[row], target)
                if other is not None:
                    slots[other] = slots[row]
                slots[row] = target
        return start

    # running ----------------------------------------------------------------------------
    def run(self, function: str, input_ids: np.ndarray, positions: np.ndarray, page_table: np.ndarray) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        batch, seq = input_ids.shape
        rows, starts, counts = [], [], []
        for row in range(batch):
            count = int(np.count_nonzero(positions[row] >= 0))
            if count == 0:
                continue  # an all-padding row: nothing to write, its output stays zero
            start = int(positions[row, 0])
            expected = np.concatenate([np.arange(start, start + count), np.full(seq - count, -1)])
            if not np.array_equal(positions[row], expected):
                raise ConfigError(f"the ONNX Runtime backend takes consecutive positions per row, padded with -1 "
                                  f"at the end; row {row} has {positions[row].tolist()}")
            if start + seq > self.max_seq_len:
                raise ConfigError(f"row {row} reaches position {start + seq - 1}, past the compiled maximum "
                                  f"of {self.max_seq_len} tokens")
            rows.append(row)
            starts.append(start)
            counts.append(count)
        model = self.models.get(function)
        if model is None:
            raise ConfigError(f"expected one of the functions {sorted(self.models)}, found {function!r}")
        logits = np.zeros((batch, self.logits_rows[model] or seq, self.vocab_size), dtype=np.float32) \
            if len(rows) < batch else None
        if not rows:
            return logits
        slots = self._slots_for(rows, starts, page_table)
        first = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else self._make_consecutive(slots)
        out = self._run_session(model, input_ids[rows], positions[rows], starts, first)
        self.slots.clock += 1
        for i in range(len(rows)):
            self.slots.length[first + i] = starts[i] + counts[i]
            self.slots.last_used[first + i] = self.slots.clock
        if len(rows) == batch:
            return out
        logits[rows] = out
        return logits

    def _slots_for(self, rows: list, starts: list, page_table: np.ndarray) -> list:
        table = self.slots
        slots: list = []
        first_pages = [int(page_table[row, 0]) for row in rows]
        if len(set(first_pages)) != len(first_pages):
            raise ConfigError(f"two rows of one batch share their first page ({first_pages}); the ONNX Runtime "
                              f"backend keeps one KV buffer row per sequence")
        busy = {table.find(p) for p, s in zip(first_pages, starts) if s > 0} - {None}
        for row, page, start in zip(rows, first_pages, starts):
            if start == 0:
                slot = table.claim(page, busy | set(slots))
            else:
                slot = table.find(page)
                if slot is None:
                    raise ConfigError(f"row {row} continues a sequence (first page {page}) at position {start} "
                                      f"that the ONNX Runtime backend no longer holds: more sequences were "
                                      f"started than its {table.num_slots} KV buffer rows")
                if start > table.length[slot]:
                    raise ConfigError(f"row {row} starts at position {start}, but only {table.length[slot]} tokens "
                                      f"of that sequence are cached")
            slots.append(slot)
        return slots

    def _run_session(self, model: str, input_ids, positions, starts: list, first: int) -> np.ndarray:
        session, io = self._session(model)
        batch, seq = input_ids.shape
        feeds = {"input_ids": np.ascontiguousarray(input_ids), "positions": np.ascontiguousarray(positions),
                 "seqlens_k": np.asarray([s + seq - 1 for s in starts], dtype=np.int32),
                 "total_sequence_length": np.asarray(max(starts) + seq, dtype=np.int32)}
        key = (batch, first)
        if self._bound.get(model) != key:  # the KV views change only with the batch's rows (~1 ms to bind)
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            self._bind_buffers(io, batch, first)
            self._bound[model] = key
        for name in self.inputs[model]:
            if name in feeds:
                io.bind_cpu_input(name, feeds[name])  # rebinding a name replaces it
        logits = np.empty((batch, self.logits_rows[model] or seq, self.vocab_size), dtype=np.float32)
        if self.device == "cpu":
            io.bind_output(self.logits_name, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        else:
            io.bind_output(self.logits_name, "cpu")
        session.run_with_iobinding(io)
        if self.device != "cpu":
            logits = io.get_outputs()[-1].numpy()
        return logits

    def _bind_buffers(self, io, batch: int, first: int) -> None:
        """past_* and present_* of every layer: the same rows [first, first + batch) of its K/V buffers."""
        for layer, pair in enumerate(self.buffers):
            for kind, buffer in zip(("key", "value"), pair):
                info = self.layers[layer]
                shape = [batch, info["num_kv_heads"], self.max_seq_len, info["head_dim"]]
                pointer = self._pointer(buffer, layer, first)
                dtype = _NUMPY[info["dtype"]]
                io.bind_input(f"past_{kind}_{layer}", self.device, 0, dtype, shape, pointer)
                io.bind_output(f"present_{kind}_{layer}", self.device, 0, dtype, shape, pointer)


def _check_backend_info(info) -> None:
    """backend_info's fields this executor reads, against the KV plan."""
    backend, plan = info.manifest["backend_info"], info.manifest["kv_cache"]

    def fail(field: str, expected: str):
        return ArtifactError(f"{info.path}: manifest field backend_info.{field} must be {expected}; the artifact is "
                             f"damaged, recompile it")

    models = backend.get("models")
    if not isinstance(models, dict) or "prefill" not in models:
        raise fail("models", "an object naming the prefill model (and prefill_last, decode)")
    for name, model in models.items():
        if not (isinstance(model, dict) and isinstance(model.get("inputs"), list)
                and all(isinstance(i, str) for i in model["inputs"])
                and (model.get("logits_rows") is None or (isinstance(model["logits_rows"], int)
                                                          and model["logits_rows"] > 0))):
            raise fail(f"models.{name}", "{file, inputs: [names], logits_rows: null or a positive count}")
        info.entry(model.get("file"), f"backend_info.models.{name}.file")
    info.entry(backend.get("data"), "backend_info.data")
    if not isinstance(backend.get("logits"), str):
        raise fail("logits", "the name of the logits output")
    layers = backend.get("kv_layers")
    if not (isinstance(layers, list) and len(layers) == plan["num_layers"] and all(
            isinstance(layer, dict) and isinstance(layer.get("dtype"), str) and layer["dtype"] in _NUMPY
            and all(isinstance(layer.get(k), int) and not isinstance(layer.get(k), bool) and layer[k] > 0
                    for k in ("num_kv_heads", "head_dim")) for layer in layers)):
        raise fail("kv_layers", f"a list of {plan['num_layers']} {{num_kv_heads, head_dim, dtype}} (one per layer of "
                                f"the KV plan)")


def load_executor(info, num_threads: int | None = None, provider: str | None = None, separate_decode: bool = False,
                  spin: bool = False):
    return ORTExecutor(info, num_threads=num_threads, provider=provider, separate_decode=separate_decode, spin=spin)
