"""The driver: the one place that strings frontend -> passes -> backend together."""

from __future__ import annotations

import collections
from typing import Any

from kiln.ir.graph import Module
from kiln.ir.mla_ops import latent_cache_reads
from kiln.ir.moe_ops import expert_reads
from kiln.ir.symbolic import symbols_of

from .progress import QUIET, Progress


def capture_source(source: Any, *, max_seq: int = 2048, max_batch: int = 64, progress: Progress = QUIET):
    """Load ``source`` and capture it; returns (kiln Module, ModelSource)."""
    from kiln.frontend.capture import capture
    from kiln.frontend.sources import load_source

    with progress.stage("loading model"):
        loaded = load_source(source)
    with progress.stage("capturing with torch.export"):
        module = capture(loaded.model, max_batch=max_batch, max_seq=max_seq)
    module.metadata["model"] = {"name": loaded.name, "kind": loaded.kind, "content_hash": loaded.content_hash,
                                "config": loaded.config}
    # torch.export lifts buffers (RoPE frequencies) into weights like parameters; the count leaves them out
    module.metadata["buffers"] = sorted(name for name, _ in loaded.model.named_buffers() if name in module.weights)
    return module, loaded


def optimize(module: Module, options=None, *, pipeline=None, verify: bool = True, print_after: str | None = None,
             stop_after: str | None = None, progress: Progress = QUIET, printer=print):
    """Run the pass pipeline; returns the PassManager (its ``records`` hold the timings)."""
    from kiln.passes import PassManager, PassOptions
    from kiln.passes.pipeline import PIPELINE

    manager = PassManager(pipeline or PIPELINE, verify=verify, print_after=print_after, stop_after=stop_after,
                          printer=printer)
    with progress.stage(f"optimizing ({len(manager.names())} passes)"):
        manager.run(module, options or PassOptions())
    module.metadata["passes"] = [{"name": r.name, "milliseconds": round(r.milliseconds, 3), "modified": r.modified}
                                 for r in manager.records]
    return manager


def op_histogram(module: Module, function: str) -> dict:
    counts = collections.Counter(n.op for n in module.functions[function].nodes)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize(module: Module) -> dict:
    """The JSON summary `kiln inspect` prints."""
    functions = {}
    symbols = set()
    for name, fn in module.functions.items():
        for p in fn.params:
            for d in p.type.shape:
                symbols |= symbols_of(d)
        functions[name] = {
            "params": {p.name: str(p.type) for p in fn.params},
            "results": [str(r.type) for r in fn.results],
            "nodes": len(fn.nodes),
        }
    entry = "step" if "step" in module.functions else next(iter(module.functions))
    return {
        "model": module.metadata.get("model", {}).get("name"),
        "functions": functions,
        "ops": op_histogram(module, entry),
        "ops_function": entry,
        "parameters": module.parameter_count(exclude=module.metadata.get("buffers", ())),
        "parameter_bytes": module.parameter_bytes(),
        "symbolic_dims": sorted(symbols),
        # declared ranges ({symbol: [least, greatest]}), e.g. a captured sequence
        # length the verifier used to prove a slice in bounds
        "symbol_ranges": {name: [least, greatest] for name, (least, greatest) in sorted(module.symbol_ranges.items())},
        "unfused_attention": module.metadata.get("unfused_attention", []),
        "kv_cache": module.metadata.get("kv_cache"),
        "quantization": module.metadata.get("quantization"),
        "activations_quantized": module.metadata.get("activations_quantized"),
        "activations": _activation_summary(module.metadata.get("activations")),
        "experts": expert_reads(module.functions[entry]),
        "latent_attention": latent_cache_reads(module.functions[entry]),
        "passes": module.metadata.get("passes", []),
    }


def _activation_summary(plans):
    """Top level peak/naive bytes of the prefill plan, with every function's plan beside them."""
    if not plans:
        return None
    main = plans.get("step") or next(iter(plans.values()))
    return {"peak_bytes": main.get("peak_bytes"), "naive_bytes": main.get("naive_bytes"), "functions": plans}
