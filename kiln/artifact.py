"""Write a compiled artifact directory atomically (a temporary sibling, then renamed into place).

An existing path is replaced only when it is a kiln artifact (recognised by its manifest), and then in one
atomic swap; anything else of the user's is refused and left untouched.
"""

from __future__ import annotations

import json
import os
import shutil

from kiln import __version__
from kiln.ir.errors import ArtifactError, ConfigError
from kiln.ir.files import check_replaceable, install_directory, make_staging_directory, sha256_of
from kiln.ir.kv_cache import DECODE_STEP, LOGITS, STEP, STEP_INPUTS
from kiln.ir.printer import print_module
from kiln.runtime.artifact import FORMAT_NAME, FORMAT_VERSION, MANIFEST, read_manifest

WEIGHTS = "weights.safetensors"
IR = "module.kir"


def write_artifact(path: str, module, source, *, backend: str, target: str, options, pipeline,
                   progress=None, check=None) -> str:
    """Lower ``module`` with ``backend`` and write the artifact at ``path``; an existing ``path``
    is replaced only once the new one is complete. ``check(staged_directory)``, when given, runs on the
    complete staged artifact before it is installed and returns entries to add to its manifest (the accuracy
    gate); when it raises, nothing is installed."""
    from .progress import QUIET

    progress = progress or QUIET

    def stage(tmp: str) -> dict:
        with progress.stage(f"building for {backend}/{target}"):
            return _stage(tmp, module, source, backend=backend, target=target, options=options, pipeline=pipeline)

    return stage_and_install(output_path(path), stage, check)


def stage_and_install(path: str, stage, check=None) -> str:
    """Build an artifact in a staging directory beside ``path`` (``stage(tmp)`` writes its files and manifest and
    returns the manifest), run ``check(tmp)`` on it and add what it returns to the manifest, then install it at
    ``path`` atomically; when any step raises, the staging directory is removed and nothing is installed."""
    tmp = make_staging_directory(path)
    try:
        manifest = stage(tmp)
        if check is not None:
            manifest.update(check(tmp))
            _write_manifest(tmp, manifest)
        install_artifact(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _stage(tmp: str, module, source, *, backend: str, target: str, options, pipeline) -> dict:
    """Write every file of the artifact and its manifest into the staging directory ``tmp``; returns the
    manifest."""
    from kiln.backends import backend_version, lowering
    from kiln.frontend.safetensors_file import write_safetensors

    lower = lowering(backend)
    if getattr(lower, "READS_WEIGHTS_FILE", True):  # ONNX Runtime keeps its own external data
        write_safetensors(os.path.join(tmp, WEIGHTS), module.weight_data)
    with open(os.path.join(tmp, IR), "w", encoding="utf-8") as f:
        f.write(print_module(module))
    lowered = lower.compile_module(module, target, tmp, options)
    tokenizer_entry, template_file = None, None
    bundle = source.tokenizer
    if bundle is not None:
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(bundle.tokenizer_json)
        tokenizer_entry = {"file": "tokenizer.json", "bos_token_id": bundle.bos_token_id,
                           "eos_token_ids": list(bundle.eos_token_ids), "add_bos_token": bundle.add_bos_token,
                           "bos_token": bundle.bos_token, "eos_token": bundle.eos_token}
        if bundle.chat_template:
            template_file = "chat_template.jinja"
            with open(os.path.join(tmp, template_file), "w", encoding="utf-8") as f:
                f.write(bundle.chat_template)
    files = sorted(os.listdir(tmp))
    assert all(os.path.isfile(os.path.join(tmp, name)) and not os.path.islink(os.path.join(tmp, name))
               for name in files), f"an artifact holds only regular files, found {files}"
    backend_files = dict(lowered.get("files", {}))
    if WEIGHTS in files:
        backend_files["weights"] = WEIGHTS
    model = dict(module.metadata.get("model", {}))
    config = model.get("config", {})
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kiln_version": __version__,
        "backend": backend,
        "backend_version": backend_version(backend),
        "target": lowered.get("target", target),
        "backend_info": {**{k: v for k, v in lowered.items() if k not in ("target", "files")},
                         "files": backend_files},
        "module": IR,
        "model": {"name": model.get("name"), "kind": model.get("kind"), "content_hash": model.get("content_hash"),
                  "vocab_size": _vocab_size(module, config), "config": config},
        "pipeline": [list(p) if isinstance(p, tuple) else p for p in pipeline],
        "passes": module.metadata.get("passes", []),
        "kv_cache": module.metadata["kv_cache"],
        "step": step_signature(module),
        "activations": module.metadata.get("activations"),
        "options": {"max_seq_len": options.max_seq_len, "max_num_seqs": options.max_num_seqs,
                    "page_size": options.page_size, "kv_cache_dtype": options.kv_cache_dtype,
                    "quantize": options.extra.get("quantize"), "activations": options.extra.get("activations", "float"),
                    "dtype": options.extra.get("dtype", "f32")},
        "quantization": module.metadata.get("quantization"),
        "tokenizer": tokenizer_entry,
        "chat_template": template_file,
        "files": {name: _file_entry(os.path.join(tmp, name)) for name in files},
    }
    _write_manifest(tmp, manifest)
    return manifest


def _write_manifest(directory: str, manifest: dict) -> None:
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


def step_signature(module) -> dict:
    """The generation entry's inputs and outputs, in order, as the executors bind them by name."""
    fn = module.functions[STEP]
    outputs = [LOGITS] + [p.name for p in fn.params[len(STEP_INPUTS):]]
    return {"function": STEP, "inputs": [{"name": p.name, "type": str(p.type)} for p in fn.params],
            "outputs": [{"name": name, "type": str(r.type)} for name, r in zip(outputs, fn.results)],
            "functions": sorted(name for name in (STEP, DECODE_STEP) if name in module.functions)}


def output_path(path) -> str:
    """The absolute output path, refused in one line when it is empty or names something that is not a kiln
    artifact (a user's file or directory is never replaced)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"the output path must be a path (str or os.PathLike), got {type(path).__name__}")
    if not os.fspath(path).strip():
        raise ConfigError(f"the output path {path!r} is empty; give a directory name for the artifact")
    path = os.path.abspath(os.fspath(path))
    check_replaceable(path, _is_artifact_dir, "kiln artifact", ConfigError)
    return path


def install_artifact(staged: str, path: str) -> None:
    """Put the complete artifact ``staged`` at ``path`` (free, or an artifact replaced atomically)."""
    install_directory(staged, path, _is_artifact_dir, "kiln artifact", ConfigError)


def _is_artifact_dir(path: str) -> bool:
    try:
        read_manifest(path)
    except ArtifactError:
        return False
    return True


def _file_entry(path: str) -> dict:
    with open(path, "rb") as f:
        return {"sha256": sha256_of(f), "bytes": os.fstat(f.fileno()).st_size}


def _vocab_size(module, config) -> int | None:
    step = module.functions.get(STEP)
    if step is not None:
        last = step.results[0].type.shape[-1]
        if isinstance(last, int):
            return last
    return config.get("vocab_size")
