"""Execution side of the ONNX Runtime backend: the ragged step over per-layer K/V buffers.

Imports only numpy and onnxruntime. kiln's runtime speaks a paged cache; GroupQueryAttention wants each
sequence contiguous, in one row (a slot) of a ``[slots, kv_heads, max_seq_len, head_dim]`` buffer per layer
and K/V, so pages are never shared (``shares_pages = False``). A sequence is known by its first page: a step
that starts it at position 0 gives it a slot, later steps find the slot through that page, ``end_sequence``
frees it.

GroupQueryAttention runs a padded ``[batch, seq]`` view of the new tokens over consecutive slots (IO binding
with a pointer into the buffers, the same memory as past and present, no copy), and takes three kinds of
batch only: every row one new token (decode), every row starting at position 0 (prompts, right-padded), or
one row continuing its sequence with several tokens (chunked prefill). So a step runs as one call per kind
present (one per continued chunk), each over the slots its sequences occupy:

- decode: the slots between two sequences of the call join it as dummy rows, which write one token at their
  sequence's cached length, where nothing is read yet (a full slot splits the call instead);
- prompts: the slots between hold no tokens yet (free, or claimed in this step), so a dummy row writes there
  harmlessly (any other splits the call);
- projections and MLPs still see only the call's real tokens: the graph gathers q/k/v into the padded view
  (``pad_index``) and the output back (``unpad_index``).

A new sequence takes the lowest free slot (prompts of one step a run of consecutive ones), so the live
sequences stay packed and a decode call covers them with few dummy rows; sequences are never moved.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kiln.ir.errors import ArtifactError, ConfigError
from kiln.ir.kv_cache import DECODE_STEP, STEP, STEP_INPUTS, KVCacheSpec

_NUMPY = {"f32": np.float32, "f16": np.float16}
# what the executor feeds beside the step's token_ids, positions and logit_rows (lower.ATTENTION_INPUTS)
_GRAPH_STEP_INPUTS = ("token_ids", "positions", "logit_rows")
_ATTENTION_INPUTS = ("pad_index", "unpad_index", "seqlens_k", "total_sequence_length")
_INPUT_DTYPES = {"token_ids": np.int64, "positions": np.int64, "token_seq": np.int32, "page_table": np.int32,
                 "logit_rows": np.int64}
# ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of 8 on the CPU. A model whose head size
# is not one keeps zero-padded heads in its buffers: zero columns add nothing to q . k, and the output's padding
# columns are dropped, so the padded attention computes the model's.
GQA_HEAD_MULTIPLE = 8


def buffer_head_dim(head_dim: int) -> int:
    """The head size of the K/V buffers (and GroupQueryAttention) for a model head size ``head_dim``."""
    return -(-head_dim // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE


def kv_buffers(spec: KVCacheSpec) -> list:
    """Per layer, the buffers GroupQueryAttention keeps: {num_kv_heads, head_dim, dtype} for a K and a V buffer, or,
    for a latent (MLA) layer, one buffer of one head holding the latent, bound as both K and V ("shared")."""
    layers = []
    for layer in range(spec.num_layers):
        group = spec.groups[spec.locate(layer)[0]]
        if group.kind == "latent":
            layers.append({"num_kv_heads": 1, "head_dim": buffer_head_dim(group.latent_dim), "dtype": spec.dtype,
                           "shared": True})
        else:
            layers.append({"num_kv_heads": group.num_kv_heads, "head_dim": buffer_head_dim(group.k_head_dim),
                           "dtype": spec.dtype})
    return layers


_BINDINGS_KEPT = 16  # IO bindings with their K/V views bound, by (rows, first slot): binding costs ~1 ms


def expected_inputs(num_layers: int) -> list:
    """The step model's inputs, in the lowering's order: what this executor feeds."""
    past = [f"past_{kind}_{layer}" for layer in range(num_layers) for kind in ("key", "value")]
    return list(_GRAPH_STEP_INPUTS) + list(_ATTENTION_INPUTS) + past


class SlotTable:
    """Which buffer row (slot) holds which sequence, and how many of its tokens are cached."""

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

    def free(self, slot: int) -> None:
        self.page_of[slot] = -1
        self.length[slot] = 0

    def claim(self, first_pages: list, busy: set) -> list:
        """Slots for sequences starting now: the slot a first page already has (the sequence restarts), else
        the lowest run of free slots that holds the rest, else the lowest free ones, else the least recently
        used slots outside ``busy`` (their sequences are dropped: continuing one is refused later)."""
        slots = [self.find(page) for page in first_pages]
        need = [i for i, s in enumerate(slots) if s is None]
        taken = busy | {s for s in slots if s is not None}
        free = [s for s in range(self.num_slots) if self.page_of[s] < 0 and s not in taken]
        run = next((free[i:i + len(need)] for i in range(len(free) - len(need) + 1)
                    if free[i + len(need) - 1] - free[i] == len(need) - 1), None) if need else []
        pool = run if run is not None else free
        pool += sorted((s for s in range(self.num_slots) if s not in taken and s not in pool),
                       key=lambda s: self.last_used[s])
        if len(pool) < len(need):
            raise ConfigError(f"the ONNX Runtime backend holds {self.num_slots} sequences at once (one KV buffer "
                              f"row each) and this step needs {len(taken) + len(need)}; run fewer sequences together "
                              f"or compile with a larger --max-num-seqs")
        for i, slot in zip(need, pool):
            slots[i] = slot
        for page, slot in zip(first_pages, slots):
            self.page_of[slot] = page
            self.length[slot] = 0
        return slots


@dataclass
class _Sequence:
    row: int  # its row of the page table
    tokens: np.ndarray  # its flat token indices in position order
    start: int  # the position of its first new token
    slot: int = -1

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def open_session(info, num_threads: int | None, provider: str | None, spin: bool = False):
    """(session, private copy, provider) for the artifact's ONNX model (backend_info.files), on ``provider``
    (default: the artifact's target's). The model and its external data are opened from a private copy whose
    bytes were hashed as they were written; the caller closes it."""
    import onnxruntime as ort

    backend = info.manifest["backend_info"]
    target = info.manifest["target"]
    if provider is None:
        provider = "CUDAExecutionProvider" if target == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise ArtifactError(f"{info.path}: compiled for {target}, but this onnxruntime has no {provider} "
                            f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                            f"or recompile with --target cpu")
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Idle pool threads spinning between kernels: a little faster on an idle machine, about half the
    # speed when other processes want the cores (measured on a shared 2-core machine).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    files = backend["files"]
    copy = info.private_copy([files.get("model"), files.get("data")], "backend_info.files")
    try:
        session = ort.InferenceSession(copy.file(files["model"]), options, providers=[provider])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types
        copy.close()
        raise ArtifactError(f"{info.path}: ONNX Runtime cannot load {files['model']} "
                            f"({' '.join(str(err).split())[:200]}); recompile the artifact") from None
    return session, copy, provider


class ORTExecutor:
    shares_pages = False  # one buffer row per sequence: no page is shared, so no prefix caching

    @property
    def max_sequences(self) -> int:
        """Sequences this executor holds at once (one buffer row each); the engine runs no more together."""
        return self.slots.num_slots

    def __init__(self, info, num_threads: int | None = None, provider: str | None = None, spin: bool = False):
        import onnxruntime as ort

        self._bindings: OrderedDict = OrderedDict()
        self.session = None
        self.spec = KVCacheSpec.from_json(info.manifest["kv_cache"])
        self.layers = _check_backend_info(info, self.spec)
        backend = info.manifest["backend_info"]
        files = backend["files"]
        self.session, self._copy, provider = open_session(info, num_threads, provider, spin)
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        self.inputs = backend["inputs"]
        self.logits_name = backend["logits"]
        found = [i.name for i in self.session.get_inputs()]
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in [self.logits_name] + [f"present_{kind}_{layer}" for layer in range(len(self.layers))
                                                    for kind in ("key", "value")] if n not in outputs]
        if found != self.inputs or missing:
            self.close()
            if missing:
                raise ArtifactError(f"{info.path}: {files['model']} has no output {missing[0]} (it must return the "
                                    f"logits and present_key/value_<layer> of every layer); recompile the artifact")
            raise ArtifactError(f"{info.path}: {files['model']} takes the inputs {', '.join(found)}, the manifest says "
                                f"{', '.join(self.inputs)}; recompile the artifact")
        self.max_seq_len = self.spec.max_seq_len
        self.vocab_size = info.manifest["model"]["vocab_size"]
        # Each slot holds a whole max_seq_len sequence: as many as the spec's pages allow.
        self.slots = SlotTable(max(1, min(self.spec.max_num_seqs, self.spec.num_pages // self.spec.pages_per_seq)))
        self.buffers = []  # per layer: (K, V) [slots, kv_heads, max_seq_len, head_dim] arrays (CPU) or OrtValues
        try:
            for layer in self.layers:
                shape = (self.slots.num_slots, layer["num_kv_heads"], self.max_seq_len, layer["head_dim"])
                dtype = _NUMPY[layer["dtype"]]
                count = 1 if layer.get("shared") else 2  # a latent layer's one buffer is its K and its V
                if self.device == "cpu":
                    buffers = [np.zeros(shape, dtype) for _ in range(count)]
                else:
                    buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0) for _ in range(count)]
                pair = (buffers[0], buffers[-1])
                self.buffers.append(pair)
        except MemoryError:
            self.close()
            raise ArtifactError(f"{info.path}: cannot allocate the KV buffers of {self.spec.total_bytes:,} bytes; "
                                f"recompile with a smaller --max-num-seqs, --max-seq-len or --kv-cache-budget") \
                from None

    # the contract ---------------------------------------------------------------------
    def has_function(self, name: str) -> bool:
        return name in (STEP, DECODE_STEP)  # one model runs both

    def end_sequence(self, first_page: int) -> None:
        """The sequence whose first page this is has ended: its buffer row is free for the next one."""
        slot = self.slots.find(first_page)
        if slot is not None:
            self.slots.free(slot)

    def close(self) -> None:
        self._bindings.clear()
        self.session = None
        self._copy.close()

    def step(self, function: str, inputs: dict) -> np.ndarray:
        if function not in (STEP, DECODE_STEP):
            raise ConfigError(f"expected the function {STEP} or {DECODE_STEP}, found {function!r}")
        if self.session is None:
            raise ConfigError("this ONNX Runtime executor was closed")
        token_ids, positions, token_seq, page_table, logit_rows = self._check_inputs(inputs)
        sequences = self._sequences(positions, token_seq, page_table)
        logits = np.empty((len(logit_rows), self.vocab_size), dtype=np.float32)
        calls = [[s] for s in sequences if s.start > 0 and len(s.tokens) > 1]
        calls += self._windows([s for s in sequences if s.start == 0 and len(s.tokens) > 1], prompts=True)
        decode = [s for s in sequences if len(s.tokens) == 1]
        self.slots.clock += 1
        for call in calls:
            self._run(call, token_ids, positions, logit_rows, logits, len(calls) == 1 and not decode)
        for call in self._windows(decode, prompts=False):  # planned on the lengths the calls above left
            self._run(call, token_ids, positions, logit_rows, logits, not calls and len(decode) == len(call))
        return logits

    # planning -----------------------------------------------------------------------------
    def _check_inputs(self, inputs: dict) -> tuple:
        arrays = []
        for name in STEP_INPUTS:
            if name not in inputs:
                raise ConfigError(f"the step takes {', '.join(STEP_INPUTS)}; {name} is missing")
            array = np.asarray(inputs[name])
            if array.dtype.kind not in "iu" or array.ndim != (2 if name == "page_table" else 1):
                raise ConfigError(f"step input {name} must be a {2 if name == 'page_table' else 1}-D integer array, "
                                  f"found {array.dtype}{list(array.shape)}")
            arrays.append(np.ascontiguousarray(array, dtype=_INPUT_DTYPES[name]))
        token_ids, positions, token_seq, page_table, logit_rows = arrays
        count = len(token_ids)
        if count == 0 or len(positions) != count or len(token_seq) != count:
            raise ConfigError(f"a step needs token_ids, positions and token_seq of one length >= 1, found "
                              f"{len(token_ids)}, {len(positions)}, {len(token_seq)}")
        for name, array, bound in (("token_ids", token_ids, self.vocab_size),
                                   ("positions", positions, self.max_seq_len),
                                   ("token_seq", token_seq, len(page_table)), ("logit_rows", logit_rows, count)):
            if array.size and (array.min() < 0 or array.max() >= bound):
                bad = array[(array < 0) | (array >= bound)][0]
                raise ConfigError(f"step input {name} holds {bad}, outside [0, {bound})")
        if page_table.shape[1] < 1:
            raise ConfigError(f"the page table must have a column per page, found shape {list(page_table.shape)}")
        return token_ids, positions, token_seq, page_table, logit_rows

    def _sequences(self, positions, token_seq, page_table) -> list:
        """The step's sequences with their tokens in position order and their slots (claimed at position 0)."""
        order = np.lexsort((positions, token_seq))
        rows = token_seq[order]
        bounds = np.flatnonzero(np.diff(rows)) + 1
        sequences, pages = [], []
        for tokens in np.split(order, bounds):
            start = int(positions[tokens[0]])
            row = int(token_seq[tokens[0]])
            if not np.array_equal(positions[tokens], np.arange(start, start + len(tokens))):
                raise ConfigError(f"the tokens of page-table row {row} must be consecutive positions, found "
                                  f"{sorted(positions[tokens].tolist())[:8]}")
            sequences.append(_Sequence(row, tokens, start))
            pages.append(int(page_table[row, 0]))
        if len(set(pages)) != len(pages):
            raise ConfigError(f"two page-table rows of one step share their first page ({pages}); the ONNX Runtime "
                              f"backend keeps one KV buffer row per sequence")
        table = self.slots
        for s, page in zip(sequences, pages):
            if s.start == 0:
                continue
            s.slot = table.find(page)
            if s.slot is None:
                raise ConfigError(f"page-table row {s.row} continues a sequence (first page {page}) at position "
                                  f"{s.start} that the ONNX Runtime backend does not hold: it was never started at "
                                  f"position 0, or more sequences were started than its {table.num_slots} KV buffer "
                                  f"rows")
            if s.start > table.length[s.slot]:
                raise ConfigError(f"page-table row {s.row} continues at position {s.start}, but only "
                                  f"{table.length[s.slot]} tokens of that sequence are cached")
        new = sorted((i for i, s in enumerate(sequences) if s.start == 0),
                     key=lambda i: len(sequences[i].tokens) == 1)  # prompts first: they get the run of free slots
        busy = {s.slot for s in sequences if s.start > 0}
        for i, slot in zip(new, table.claim([pages[i] for i in new], busy)):
            sequences[i].slot = slot
        return sequences

    def _windows(self, members: list, prompts: bool) -> list:
        """``members`` split into runs of slots that one call covers: the slots between two members must take a
        dummy row (a prompt call's: hold no tokens; a decode call's: have room for one more)."""
        calls = []
        for s in sorted(members, key=lambda s: s.slot):
            if calls:
                gap = range(calls[-1][-1].slot + 1, s.slot)
                if all(self._dummy_ok(slot, prompts) for slot in gap):
                    calls[-1].append(s)
                    continue
            calls.append([s])
        return calls

    def _dummy_ok(self, slot: int, prompts: bool) -> bool:
        length = self.slots.length[slot]
        return length == 0 if prompts else length < self.max_seq_len

    # running ---------------------------------------------------------------------------
    def _run(self, call: list, token_ids, positions, logit_rows, logits, whole: bool) -> None:
        """One GroupQueryAttention batch over slots [first, last] of ``call``; ``whole``: it holds every token
        of the step in flat order, so its inputs and logits are the step's own."""
        first, last = call[0].slot, call[-1].slot
        batch = last - first + 1
        seq = max(len(s.tokens) for s in call)
        if whole:
            local = None
            count = len(token_ids)
        else:
            local = np.sort(np.concatenate([s.tokens for s in call]))
            count = len(local)
            where = np.full(len(token_ids), -1, dtype=np.int64)
            where[local] = np.arange(count)
        pad_index = np.zeros((batch, seq), dtype=np.int64)
        unpad_index = np.empty(count, dtype=np.int64)
        seqlens_k = np.zeros(batch, dtype=np.int32)
        if seq == 1:  # dummy rows write one token at their cached length
            seqlens_k[:] = self.slots.length[first:last + 1]
        for s in call:
            row = s.slot - first
            tokens = s.tokens if local is None else where[s.tokens]
            pad_index[row, :len(tokens)] = tokens
            pad_index[row, len(tokens):] = tokens[-1]
            unpad_index[tokens] = row * seq + np.arange(len(tokens))
            seqlens_k[row] = s.end - 1
        feeds = {"pad_index": pad_index, "unpad_index": unpad_index, "seqlens_k": seqlens_k,
                 "total_sequence_length": np.asarray(int(seqlens_k.max()) + 1, dtype=np.int32)}
        if local is None:
            feeds.update(token_ids=token_ids, positions=positions, logit_rows=logit_rows)
            out = logits
        else:
            wanted = where[logit_rows] >= 0
            feeds.update(token_ids=token_ids[local], positions=positions[local],
                         logit_rows=np.ascontiguousarray(where[logit_rows[wanted]]))
            out = np.empty((int(wanted.sum()), self.vocab_size), dtype=np.float32)
        self._session_run(batch, first, feeds, out)
        if local is not None:
            logits[wanted] = out
        for s in call:
            self.slots.length[s.slot] = s.end
            self.slots.last_used[s.slot] = self.slots.clock

    def _session_run(self, batch: int, first: int, feeds: dict, out: np.ndarray) -> None:
        io = self._binding(batch, first)
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)  # rebinding a name replaces it
        if self.device == "cpu":
            io.bind_output(self.logits_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            self.session.run_with_iobinding(io)
        else:
            io.bind_output(self.logits_name, "cpu")
            self.session.run_with_iobinding(io)
            out[...] = io.get_outputs()[-1].numpy()  # bound after the presents

    def _binding(self, batch: int, first: int):
        """An IO binding whose past_* and present_* of every layer are rows [first, first + batch) of the K/V
        buffers (the same memory), kept for the next call over the same rows."""
        key = (batch, first)
        io = self._bindings.pop(key, None)
        if io is None:
            io = self.session.io_binding()
            for layer, (pair, info) in enumerate(zip(self.buffers, self.layers)):
                shape = [batch, info["num_kv_heads"], self.max_seq_len, info["head_dim"]]
                dtype = _NUMPY[info["dtype"]]
                for kind, buffer in zip(("key", "value"), pair):
                    base = buffer.ctypes.data if isinstance(buffer, np.ndarray) else buffer.data_ptr()
                    pointer = base + first * int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
                    io.bind_input(f"past_{kind}_{layer}", self.device, 0, dtype, shape, pointer)
                    io.bind_output(f"present_{kind}_{layer}", self.device, 0, dtype, shape, pointer)
            if len(self._bindings) >= _BINDINGS_KEPT:
                self._bindings.popitem(last=False)
        self._bindings[key] = io
        return io


def _check_backend_info(info, spec: KVCacheSpec) -> list:
    """backend_info's fields this executor reads, against the KV-cache spec; returns the per-layer buffers."""
    backend = info.manifest["backend_info"]

    def fail(field: str, expected: str):
        return ArtifactError(f"{info.path}: manifest field backend_info.{field} must be {expected}; the artifact is "
                             f"damaged, recompile it")

    for role in ("model", "data"):
        info.entry(backend["files"].get(role), f"backend_info.files.{role}")
    expected = expected_inputs(spec.num_layers)
    inputs = backend.get("inputs")
    if not (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs)):
        raise fail("inputs", "the list of the step model's input names")
    unknown = [i for i in inputs if i not in expected]
    if unknown:
        raise ArtifactError(f"{info.path}: the step model takes the input {unknown[0]!r}, which this executor does not "
                            f"feed (it feeds {', '.join(expected[:len(_GRAPH_STEP_INPUTS) + len(_ATTENTION_INPUTS)])} "
                            f"and past_key_<layer>, past_value_<layer>); recompile the artifact")
    if inputs != expected:
        absent = [i for i in expected if i not in inputs]
        raise fail("inputs", f"{', '.join(expected[:7])}, then past_key_<l>, past_value_<l> for each of the "
                             f"{spec.num_layers} layers" + (f" (missing {absent[0]})" if absent else " in that order"))
    if not isinstance(backend.get("logits"), str):
        raise fail("logits", "the name of the logits output")
    layers = backend.get("kv_layers")
    if not (isinstance(layers, list) and len(layers) == spec.num_layers and all(
            isinstance(layer, dict) and isinstance(layer.get("dtype"), str) and layer["dtype"] in _NUMPY
            and all(isinstance(layer.get(k), int) and not isinstance(layer.get(k), bool) and layer[k] > 0
                    for k in ("num_kv_heads", "head_dim")) for layer in layers)):
        raise fail("kv_layers", f"a list of {spec.num_layers} {{num_kv_heads, head_dim, dtype}} (one per layer of "
                                f"the KV-cache spec)")
    for index, (layer, declared) in enumerate(zip(layers, kv_buffers(spec))):
        if layer != declared:
            raise fail(f"kv_layers[{index}]", f"{declared} (layer {index} of the KV-cache spec)")
    return layers


def load_executor(info, num_threads: int | None = None, provider: str | None = None, spin: bool = False):
    return ORTExecutor(info, num_threads=num_threads, provider=provider, spin=spin)
