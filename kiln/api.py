"""kiln's Python embedding API: ``kiln.compile`` and ``kiln.load``."""

from __future__ import annotations

import inspect
import math
import os
import re
import shutil
import tempfile

from kiln.ir.errors import ConfigError

from .progress import QUIET, Progress


class Artifact:
    """A compiled model: a complete artifact directory (temporary until saved)."""

    def __init__(self, path: str, temporary: bool):
        self.path = path
        self._temporary = temporary

    @property
    def manifest(self) -> dict:
        from kiln.runtime.artifact import read_manifest

        return read_manifest(self.path)

    def save(self, path) -> str:
        """Copy the artifact to ``path`` atomically (a temporary sibling, then rename). ``path`` must be free or
        an existing kiln artifact, which is replaced; anything else is refused and left untouched."""
        from kiln.ir.files import make_staging_directory

        from .artifact import install_artifact, output_path

        path = output_path(path)
        if os.path.realpath(path) == os.path.realpath(self.path):
            return path
        tmp = make_staging_directory(path)
        try:
            staged = os.path.join(tmp, "artifact")
            shutil.copytree(self.path, staged, symlinks=True)
            install_artifact(staged, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def __del__(self):
        if getattr(self, "_temporary", False):
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

    def __repr__(self) -> str:
        return f"<kiln.Artifact {self.path}>"


TEMPORARY_PREFIX = "kiln-artifact-"  # kiln-artifact-<pid>-<random>: a compile with no output path
QUANTIZE_MODES = ("none", "int8", "int4", "int4-g128", "gguf")  # int4: groups of 32; gguf: the file's blocks
# what quantized linears multiply: x as it is, or x in int8 per block of 32; auto picks (resolve_activations)
ACTIVATION_MODES = ("auto", "float", "int8")
INTEGER_DOT_BACKENDS = ("tvm", "onnxruntime")  # whose CPU kernels multiply int8 activations as integers
# what the model computes in; auto is f32 on every backend, f16 / bf16 where resolve_dtype offers them
COMPUTE_DTYPES = ("auto", "f32", "f16", "bf16")


def compile_options(*, max_seq_len=2048, max_num_seqs=4, page_size=16, kv_cache_dtype="f32",
                    kv_cache_budget=None, activation_seq_len=None, quantize=None, quantize_zero_points=True,
                    quantize_embedding=True, activations="auto", accuracy_gate="refuse", dtype="auto"):
    from kiln.passes import PassOptions

    from .accuracy import check_mode

    for name, value in (("max_seq_len", max_seq_len), ("max_num_seqs", max_num_seqs), ("page_size", page_size),
                        ("activation_seq_len", activation_seq_len or 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if kv_cache_budget is not None and (not isinstance(kv_cache_budget, (int, float)) or isinstance(kv_cache_budget, bool)
                                        or not math.isfinite(kv_cache_budget) or kv_cache_budget < 1):
        raise ConfigError(f"kv_cache_budget must be None or a positive, finite number of bytes, got {kv_cache_budget!r}")
    if kv_cache_dtype not in ("f32", "f16"):
        raise ConfigError(f"kv_cache_dtype must be 'f32' or 'f16', got {kv_cache_dtype!r}")
    if quantize not in (None,) + QUANTIZE_MODES:
        raise ConfigError(f"quantize must be None or one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    if activations not in ACTIVATION_MODES:
        raise ConfigError(f"activations must be 'auto', 'float' (exact) or 'int8' (quantized per block of 32 for "
                          f"integer dot products; quantized weights only), got {activations!r}")
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)} (the compute dtype; auto is f32), "
                          f"got {dtype!r}")
    extra = {"dtype": dtype, "quantize": quantize, "quantize_zero_points": bool(quantize_zero_points),
             "quantize_embedding": bool(quantize_embedding), "activations": activations,
             "accuracy_gate": check_mode(accuracy_gate)}
    return PassOptions(max_seq_len=max_seq_len, max_num_seqs=max_num_seqs, page_size=page_size,
                       kv_cache_dtype=kv_cache_dtype,
                       memory_budget_bytes=None if kv_cache_budget is None else int(kv_cache_budget),
                       activation_seq_len=activation_seq_len or min(max_seq_len, 128), extra=extra)


def resolve_quantize(pass_options, source_info, progress: Progress = QUIET) -> str:
    """Settle the quantize mode against the loaded source (None -> "gguf" for a quantized GGUF, else
    "none") and hand the file's blocks to the pass for "gguf"; returns the mode."""
    mode = pass_options.extra.get("quantize")
    blocks = {}
    if mode in (None, "gguf") and source_info.prequantized is not None:
        with progress.stage("importing GGUF quantized blocks"):
            blocks = source_info.prequantized()
    if mode is None:
        mode = "gguf" if blocks else "none"
    if mode == "gguf" and not blocks:
        raise ConfigError(f"quantize='gguf' keeps a GGUF file's Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q4_K / Q6_K blocks, but "
                          f"{source_info.name!r} "
                          f"{'holds none' if source_info.kind == 'gguf' else 'is not a GGUF file'}; "
                          "use none, int8, int4 or int4-g128")
    pass_options.extra["quantize"] = mode
    pass_options.extra["prequantized"] = blocks if mode == "gguf" else None
    return mode


def resolve_activations(pass_options, backend: str, target: str) -> str:
    """Settle activations="auto" once the quantize mode is known: int8 for quantized weights on a CPU backend
    whose kernels multiply int8 activations as integers (TVM's VNNI kernels, ONNX Runtime's MatMulNBits), as
    llama.cpp does (SmolLM2: +0.35-0.77% perplexity over the same weights, see the README's quality table),
    float otherwise (fp32 weights, CUDA, the numpy reference); returns the mode."""
    mode = pass_options.extra.get("activations") or "auto"
    if mode == "auto":
        quantized = pass_options.extra.get("quantize") not in (None, "none")
        mode = "int8" if quantized and target == "cpu" and backend in INTEGER_DOT_BACKENDS else "float"
    pass_options.extra["activations"] = mode
    return mode


# (backend, target) where f16 / bf16 compute runs: TVM on CUDA; TVM on the CPU, where halving the weights' bytes
# makes decode faster (benchmarks/bench_half_cpu.py, 2 threads: SmolLM2 f16 1.28-1.31x and bf16 1.25x f32's decode
# tok/s, prefill about even; a 2-layer tiny Llama, bound by kernel launches, decodes at 0.86x); the numpy reference
# backend, which checks what the half graph computes (f16 in numpy, bf16 through ml_dtypes: f32 arithmetic rounded
# per op)
HALF_COMPUTE = {("tvm", "cuda"), ("tvm", "cpu"), ("reference", "cpu")}
# why the others compute in f32
HALF_REFUSED = {
    ("onnxruntime", "cpu"): "kiln's ONNX Runtime lowering takes f32 activations, and ONNX Runtime's CPU provider has "
                            "no bf16 MatMul and an f16 MatMul no faster than f32 (0.98-1.03x on SmolLM2's shapes)",
    ("onnxruntime", "cuda"): "kiln's ONNX Runtime lowering takes f32 activations",
}


def resolve_dtype(pass_options, backend: str, target: str) -> str:
    """Settle the compute dtype: "auto" is f32 on every backend and target, f16 / bf16 weights widened once at
    compile time (exact), as llama.cpp computes in f32 from f16 weights on the CPU. "f16" / "bf16" compute in
    that type (pass narrow_compute_dtype: f32 accumulation, norm statistics, softmax, RoPE angles and logits)
    where kiln offers it (HALF_COMPUTE: the tvm backend on CUDA and on the CPU, the reference backend); elsewhere
    they are refused in one line that says why. Returns the dtype."""
    dtype = pass_options.extra.get("dtype") or "auto"
    if dtype in ("f16", "bf16"):
        if (backend, target) not in HALF_COMPUTE:
            why = HALF_REFUSED.get((backend, target), f"the {backend} backend computes in f32 on {target}")
            raise ConfigError(f"dtype {dtype!r} asks for {dtype} compute, which the {backend} backend does not offer "
                              f"on {target}: {why}; use dtype 'auto' or 'f32' ({dtype} weights "
                              f"are widened to f32 at compile time), or {dtype} with --backend tvm")
        return dtype
    pass_options.extra["dtype"] = "f32"
    return "f32"


def compile(source, backend: str = "tvm", target: str = "cpu", quantize=None, max_seq_len: int = 2048, *,
            output=None, progress: Progress | bool = False, **options) -> Artifact:
    """Compile ``source`` ("smollm2", a .gguf path, a Hugging Face checkpoint dir or a torch.nn.Module).

    ``quantize``: "none" (fp32), "int8" (per output channel), "int4" (groups of 32), "int4-g128", or
    "gguf" (a quantized GGUF file's Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q4_K / Q6_K blocks as they are). None (the default) is
    "gguf" for a quantized GGUF source and "none" otherwise. int4 groups carry an offset (their
    minimum) unless ``quantize_zero_points=False``; the embedding table and the logits projection
    become int8 per row in the int8 / int4 modes unless ``quantize_embedding=False``.
    ``activations``: "float" (quantized linears multiply the activations as they are), "int8" (each row
    quantized per block of 32 first, as llama.cpp and ONNX Runtime's accuracy_level 4 do, so the kernels use
    integer dot products: VNNI on the TVM CPU backend, MatMulNBits accuracy_level 4 on ONNX Runtime) or
    "auto" (the default: int8 for quantized weights on the CPU with the tvm or onnxruntime backend, else
    float). The choice is an attribute of each ``linear_q`` in the IR.
    ``accuracy_gate``: before the artifact is installed, its logits on a short built-in text are compared with
    the source model's in torch eager (top-1 agreement, mean KL; recorded in the manifest as ``accuracy``).
    "refuse" (default): below the thresholds of :mod:`kiln.accuracy` the compile raises ConfigError and
    installs nothing; "warn": it installs with an :class:`kiln.accuracy.AccuracyWarning`; "off": no check.
    ``dtype``: the compute dtype, "auto" (the default) or "f32": f16 / bf16 weights (a half-precision module,
    checkpoint or GGUF) are widened to f32 once at compile time and the model computes in f32. "f16" and "bf16"
    compute in that type (weights and activations; norm statistics, softmax, attention scores, RoPE angles and
    the logits in f32) with backend="tvm" (CUDA and CPU) and on the reference backend; onnxruntime refuses them
    with the reason.
    """
    from kiln.backends import check_backend

    from .artifact import write_artifact
    from .driver import capture_source, optimize

    from .artifact import output_path

    check_backend(backend)
    if target not in ("cpu", "cuda"):
        raise ConfigError(f"unknown target {target!r}; expected 'cpu' or 'cuda'")
    known = [name for name in inspect.signature(compile_options).parameters if name not in ("max_seq_len", "quantize")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown compile option {', '.join(unknown)}; expected one of {', '.join(known)}")
    pass_options = compile_options(max_seq_len=max_seq_len, quantize=quantize, **options)
    resolve_dtype(pass_options, backend, target)
    if output is not None:
        output = output_path(output)  # refused before any work when it is not free or an artifact
    progress = Progress() if progress is True else (progress or QUIET)
    from .embedding import compile_embedding, is_embedding_source

    if is_embedding_source(source):  # an encoder: an @embed entry and no KV cache (kiln/embedding.py)
        holder = None if output is not None else tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-")
        try:
            path = compile_embedding(source, backend=backend, target=target, quantize=quantize,
                                     max_seq_len=max_seq_len, output=output or os.path.join(holder, "model.kiln"),
                                     pass_options=pass_options, progress=progress)
        except BaseException:
            if holder is not None:
                shutil.rmtree(holder, ignore_errors=True)
            raise
        return Artifact(path, temporary=holder is not None)
    module, source_info = capture_source(source, max_seq=max_seq_len, progress=progress)
    resolve_quantize(pass_options, source_info, progress)
    resolve_activations(pass_options, backend, target)
    manager = optimize(module, pass_options, progress=progress)
    check_fits_in_memory(module, pass_options, target)
    if output is None:
        from kiln.ir.files import remove_stale

        remove_stale(tempfile.gettempdir(), re.compile(rf"^{TEMPORARY_PREFIX}(\d+)-"))
        holder = tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-")
        path, temporary = os.path.join(holder, "model.kiln"), True
    else:
        holder, path, temporary = None, output, False

    def accuracy_gate(staged: str) -> dict:
        from .accuracy import run_gate

        return {"accuracy": run_gate(staged, source_info.model, mode=pass_options.extra["accuracy_gate"],
                                     backend=backend, target=target, progress=progress)}

    try:
        write_artifact(path, module, source_info, backend=backend, target=target, options=pass_options,
                       pipeline=manager.pipeline, progress=progress, check=accuracy_gate)
    except BaseException:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)
        raise
    return Artifact(path, temporary)


def check_fits_in_memory(module, options, target: str) -> None:
    """Refuse, at compile time and with the bytes needed, options whose KV cache with the weights and the
    planned activations cannot fit in this machine's memory (the cache is allocated on the host first even
    for a GPU)."""
    from kiln.ir.files import memory_bytes

    kv = module.metadata["kv_cache"]
    weights = module.parameter_bytes()
    plans = module.metadata.get("activations") or {}
    activations = max((plan.get("peak_bytes", 0) for plan in plans.values()), default=0)
    need = kv["total_bytes"] + weights + activations
    available = memory_bytes()
    if need > available:
        sizing = (f"a budget of {kv['budget_bytes']:,} bytes" if kv.get("budget_bytes") is not None else
                  f"{kv['max_num_seqs']} sequences (--max-num-seqs) of {kv['max_seq_len']:,} tokens (--max-seq-len)")
        raise ConfigError(f"the KV cache for {sizing} takes {kv['total_bytes']:,} bytes ({kv['bytes_per_token']:,} "
                          f"per token); with {weights:,} bytes of weights and {activations:,} of activations that is "
                          f"{need:,} bytes, more than this machine's {available:,}; lower --max-seq-len or "
                          f"--max-num-seqs, or set a smaller --kv-cache-budget")


def load(artifact, **backend_options):
    """Load a compiled artifact (a directory or an :class:`Artifact`) into an Engine."""
    from kiln.runtime.engine import Engine

    if not isinstance(artifact, (Artifact, str, os.PathLike)):
        raise ConfigError(f"kiln.load takes an artifact directory or a kiln.Artifact, got {type(artifact).__name__}")
    path = artifact.path if isinstance(artifact, Artifact) else os.fspath(artifact)
    engine = Engine.from_path(path, **backend_options)
    if isinstance(artifact, Artifact):
        engine._artifact = artifact  # keep a temporary artifact alive while the engine uses it
    return engine
