"""The driver for encoder-only embedding models: a sentence-transformers directory or a BERT, RoBERTa or
XLM-RoBERTa checkpoint -> capture -> EMBEDDING_PIPELINE -> the backend's ``@embed`` -> an artifact whose manifest
has an ``embedding`` field (pooling, normalisation, maximum length), checked against the torch module before it is
installed."""

from __future__ import annotations

import os

import numpy as np

from kiln import __version__
from kiln.ir.embedding import EMBED, EMBED_INPUTS
from kiln.ir.errors import ConfigError

from .progress import QUIET, Progress

EMBEDDING_BACKENDS = ("tvm", "onnxruntime")
# Sentences the gate embeds in one batch: different lengths, so padding and the key mask are exercised.
GATE_TEXTS = ("A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank today.",
              "kiln")
# An fp32 compile agrees with torch to ~1e-7 in cosine (measured: all-MiniLM-L6-v2 on both backends); a wrong
# mask, pooling or layer moves it by far more than 1e-3.
MIN_COSINE = 0.999


def is_embedding_source(source) -> bool:
    from kiln.frontend.sentence_transformers import is_embedding_source as check

    return check(source)


def compile_embedding(source, *, backend: str, target: str, quantize, max_seq_len: int, output: str, pass_options,
                      progress: Progress = QUIET) -> str:
    """Compile the embedding model at ``source`` into the artifact directory ``output``; returns it.
    ``pass_options`` are kiln.compile's checked options: only max_seq_len and the accuracy gate apply."""
    if backend not in EMBEDDING_BACKENDS:
        raise ConfigError(f"embedding models compile for {' or '.join(EMBEDDING_BACKENDS)}, not {backend!r}")
    if quantize not in (None, "none"):
        raise ConfigError(f"embedding models compile in fp32; quantize {quantize!r} is not supported for them")
    if pass_options.extra.get("dtype") in ("f16", "bf16"):
        raise ConfigError(f"embedding models compute in f32; dtype {pass_options.extra['dtype']!r} is not supported "
                          "for them (use dtype 'auto' or 'f32')")
    module, loaded, manager = capture_embedding(source, max_seq_len=max_seq_len, pass_options=pass_options,
                                                progress=progress)
    spec, length = loaded.spec, module.metadata["capture"]["max_seq"]
    embedding = {**spec.to_json(), "max_seq_len": length, "function": EMBED, "inputs": list(EMBED_INPUTS)}

    def gate(staged: str) -> dict:
        return {"accuracy": run_embedding_gate(staged, loaded.module, mode=pass_options.extra["accuracy_gate"],
                                               backend=backend, target=target, progress=progress)}

    return write_embedding_artifact(output, module, loaded.tokenizer, embedding, backend=backend, target=target,
                                    pipeline=manager.pipeline, progress=progress, check=gate)


def capture_embedding(source, *, max_seq_len: int, pass_options, progress: Progress = QUIET, print_after=None,
                      stop_after=None):
    """Load, capture and optimize the embedding model at ``source`` for texts of up to ``max_seq_len`` tokens
    (fewer when the model's own limit is lower); returns (module with @embed, the loaded model, the
    PassManager)."""
    from kiln.frontend.sentence_transformers import capture_embedder, load_embedding_model
    from kiln.frontend.sources import content_hash
    from kiln.passes.pipeline import EMBEDDING_PIPELINE

    from .driver import optimize

    with progress.stage("loading embedding model"):
        loaded = load_embedding_model(source)
    length = min(loaded.spec.max_seq_len, max_seq_len)
    if length < 2:
        raise ConfigError(f"an embedding model takes at least 2 tokens ([CLS] and [SEP], or <s> and </s>); "
                          f"max_seq_len is {length}")
    with progress.stage("capturing with torch.export"):
        module = capture_embedder(loaded.module, max_seq=length)
    name = os.path.basename(os.path.normpath(os.fspath(source)))
    module.metadata["model"] = {"name": name, "kind": loaded.spec.source,
                                "content_hash": content_hash(os.fspath(source)), "vocab_size": loaded.vocab_size,
                                "config": loaded.config}
    manager = optimize(module, pass_options, pipeline=EMBEDDING_PIPELINE, print_after=print_after,
                       stop_after=stop_after, progress=progress)
    module.functions[EMBED] = module.functions.pop("forward")
    module.functions[EMBED].name = EMBED
    return module, loaded, manager


def write_embedding_artifact(path: str, module, tokenizer, embedding: dict, *, backend: str, target: str, pipeline,
                             progress: Progress = QUIET, check=None) -> str:
    """Stage every file and the manifest beside ``path``, run ``check`` on the staged artifact, then install it
    atomically (as kiln.artifact.write_artifact does for a causal LM)."""
    import importlib

    from kiln.backends import backend_version
    from kiln.frontend.safetensors_file import write_safetensors
    from kiln.ir.printer import print_module
    from kiln.runtime.artifact import FORMAT_NAME, FORMAT_VERSION

    from .artifact import IR, WEIGHTS, _file_entry, _write_manifest, stage_and_install

    def stage(tmp: str) -> dict:
        with progress.stage(f"building for {backend}/{target}"):
            lower = importlib.import_module(f"kiln.backends.{backend}.encoder_lower")
            if backend == "tvm":  # ONNX Runtime keeps the weights in its own external data file
                write_safetensors(os.path.join(tmp, WEIGHTS), module.weight_data)
            with open(os.path.join(tmp, IR), "w", encoding="utf-8") as f:
                f.write(print_module(module))
            lowered = lower.compile_embedding(module, EMBED, target, tmp)
            with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(tokenizer.tokenizer_json)
        files = sorted(os.listdir(tmp))
        backend_files = dict(lowered["files"])
        if WEIGHTS in files:
            backend_files["weights"] = WEIGHTS
        model = module.metadata["model"]
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kiln_version": __version__,
            "backend": backend, "backend_version": backend_version(backend), "target": lowered["target"],
            "backend_info": {**{k: v for k, v in lowered.items() if k not in ("target", "files")},
                             "files": backend_files},
            "module": IR,
            "model": model,
            "pipeline": [list(p) if isinstance(p, tuple) else p for p in pipeline],
            "passes": module.metadata.get("passes", []),
            "embedding": embedding,
            "tokenizer": {"file": "tokenizer.json", "bos_token_id": tokenizer.bos_token_id,
                          "eos_token_ids": list(tokenizer.eos_token_ids), "add_bos_token": tokenizer.add_bos_token,
                          "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token},
            "chat_template": None,
            "files": {name: _file_entry(os.path.join(tmp, name)) for name in files},
        }
        _write_manifest(tmp, manifest)
        return manifest

    return stage_and_install(path, stage, check)


def run_embedding_gate(artifact_path: str, model, *, mode: str, backend: str, target: str, progress) -> dict:
    """The staged artifact's vectors for GATE_TEXTS against the torch module's: the lowest cosine. Below
    MIN_COSINE the compile is refused ("refuse") or installed with a warning ("warn")."""
    import torch

    from kiln.runtime.embedding import EmbeddingEngine
    from kiln.runtime.artifact import open_artifact

    from .accuracy import _say, cannot_run_here

    if mode == "off":
        return {"mode": "off", "skipped": "--accuracy-gate off"}
    why = cannot_run_here(backend, target)
    if why is not None:
        _say(progress, f"accuracy not checked: {why}")
        return {"mode": mode, "skipped": why}
    with progress.stage("checking embeddings against torch eager"):
        with EmbeddingEngine(open_artifact(artifact_path)) as engine:
            compiled = engine.embed(list(GATE_TEXTS)).astype(np.float64)
            encoded = [engine.tokenizer.encode(text) for text in GATE_TEXTS]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in encoded])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in encoded])
        with torch.no_grad():
            reference = model(ids, mask).double().numpy()
    cosine = np.sum(compiled * reference, axis=1) / (np.linalg.norm(compiled, axis=1) *
                                                     np.linalg.norm(reference, axis=1))
    record = {"mode": mode, "texts": len(GATE_TEXTS), "min_cosine": float(cosine.min()), "threshold": MIN_COSINE,
              "passed": bool(cosine.min() >= MIN_COSINE)}
    _say(progress, f"embeddings vs torch eager: lowest cosine {cosine.min():.7f}")
    if record["passed"]:
        return record
    message = (f"the compiled embeddings disagree with the source model: lowest cosine {cosine.min():.6f} over "
               f"{len(GATE_TEXTS)} texts, below {MIN_COSINE}")
    if mode == "refuse":
        raise ConfigError(message + "; or pass --accuracy-gate warn (accuracy_gate='warn') to install it anyway")
    _say(progress, f"warning: {message}; installed anyway (--accuracy-gate warn)", warn=True)
    return record
