"""Half-precision sources: bf16 / f16 torch modules, checkpoint directories and GGUF files compile on every
backend and compute, in f32, what transformers computes from the same half weights upcast (``model.float()``);
the content hash tells dtypes apart; ``dtype`` / ``--dtype`` refuses half compute in one line where no kernels
take it (f16 / bf16 compute is test_half_compute.py's)."""

import copy
import itertools

import numpy as np
import pytest
import torch

import kiln
import kiln.api
from kiln.ir.errors import ConfigError

from test_cli import kiln_cli
from tiny_models import (ENGINE_PROMPT, FP32_TOLERANCE, assert_engine_matches_transformers, build_tiny_model,
                         relative_error)

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
SAFETENSORS_NAMES = {"bf16": "BF16", "f16": "F16"}
BACKENDS = ("reference", "tvm", "onnxruntime")
FAMILIES = ("llama", "gpt2", "phi3")  # kiln's own module (for a checkpoint) and two transformers families

# Every backend, dtype, family and source kind runs at least once without -m slow (a compile and a
# transformers generate each, ~5 s); the rest of the cross product is slow.
FAST = {("module", "llama", "bf16", "reference"), ("module", "llama", "f16", "tvm"),
        ("module", "gpt2", "bf16", "onnxruntime"), ("directory", "llama", "bf16", "tvm"),
        ("directory", "llama", "f16", "onnxruntime"), ("directory", "phi3", "bf16", "reference")}


def _cases():
    for case in itertools.product(("module", "directory"), FAMILIES, DTYPES, BACKENDS):
        yield pytest.param(*case, marks=() if case in FAST else pytest.mark.slow, id="-".join(case))


def _half_model(family: str, dtype: str):
    return build_tiny_model(family).to(DTYPES[dtype])


# ---------------------------------------------------------------------------------------- end to end

# Tolerance: FP32_TOLERANCE (1e-5 of the largest logit), the fp32 bound unchanged. Widening a half weight to
# f32 is exact, so kiln and the reference multiply the same f32 numbers; computing in the half dtype instead
# is 100x off (test_the_tolerance_tells_f32_from_half_compute).
@pytest.mark.parametrize("kind, family, dtype, backend", _cases())
def test_half_source_matches_transformers_on_the_upcast_weights(kind, family, dtype, backend, tmp_path):
    import transformers

    from kiln.frontend.safetensors_file import SafetensorsFile

    half = _half_model(family, dtype)
    if kind == "module":
        source = half
        reference = copy.deepcopy(half).float()
    else:
        half.save_pretrained(tmp_path, safe_serialization=True)
        # the file really holds half tensors: the path under test is the safetensors reader's BF16 / F16
        stored = {info.dtype_name for info in SafetensorsFile(tmp_path / "model.safetensors").tensors.values()}
        assert stored == {SAFETENSORS_NAMES[dtype]}
        source = str(tmp_path)
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    artifact = kiln.compile(source, backend=backend, max_seq_len=128)
    assert artifact.manifest["options"]["dtype"] == "f32"
    assert artifact.manifest["accuracy"]["passed"]
    assert_engine_matches_transformers(kiln.load(artifact), family, model=reference)


def test_the_tolerance_tells_f32_from_half_compute():
    half = _half_model("llama", "bf16")
    ids = torch.as_tensor([ENGINE_PROMPT])
    with torch.no_grad():
        in_half = half(ids).logits[0].float().numpy()
        upcast = copy.deepcopy(half).float()(ids).logits[0].numpy()
    assert relative_error(in_half, upcast) > 100 * FP32_TOLERANCE


@pytest.mark.parametrize("ggml", ["F16", "BF16"])
def test_half_gguf_matches_transformers_on_the_same_rounded_weights(ggml, tmp_path):
    from gguf import GGMLQuantizationType

    from kiln.frontend.gguf_file import GGUFFile
    from test_gguf import tiny_transformers_llama, write_llama_gguf

    model = tiny_transformers_llama(False)
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, ggml_type=GGMLQuantizationType[ggml])
    # the writer stores matrices in the half type, vectors (norms) in f32; the reference rounds the same
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for param in reference.parameters():
            if param.dim() == 2:
                param.copy_(param.to(DTYPES[ggml.lower()]).float())
    types = {info.ggml_type.name for info in GGUFFile(str(path)).tensors.values()}
    assert types == {ggml, "F32"}
    artifact = kiln.compile(str(path), backend="onnxruntime", max_seq_len=128)
    assert_engine_matches_transformers(kiln.load(artifact), "llama", model=reference)


# ------------------------------------------------------------------------------------------- the pass

def test_the_pipeline_makes_the_graph_of_model_float():
    """The optimized IR of a half module is the text of its model.float()'s: the backends (and the nvcc-only
    CUDA build of test_tvm_cuda.py) see exactly the f32 graph they are tested on."""
    from kiln.frontend.capture import capture
    from kiln.ir.printer import print_module
    from kiln.passes.manager import PassManager, PassOptions
    from kiln.passes.pipeline import PIPELINE

    half = _half_model("llama", "bf16")
    texts = []
    for model in (half, copy.deepcopy(half).float()):
        module = capture(model, max_seq=32)
        PassManager(PIPELINE).run(module, PassOptions(max_seq_len=32, max_num_seqs=2, page_size=8))
        texts.append(print_module(module))
    assert texts[0] == texts[1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_set_compute_dtype_widens_every_half_weight_exactly(dtype):
    from kiln.frontend.capture import capture
    from kiln.passes import run_pass

    half = _half_model("gpt2", dtype)
    module = capture(half, max_seq=32)
    assert {t.dtype for t in module.weights.values()} == {dtype}
    assert run_pass("set_compute_dtype", module)
    assert {t.dtype for t in module.weights.values()} == {"f32"}
    for fn in module.functions.values():
        for node in fn.nodes:
            assert node.attrs.get("dtype") not in DTYPES, node
            assert all(v.type.dtype not in DTYPES for v in node.outputs), node
    expected = {name: tensor.float().numpy() for name, tensor in half.state_dict().items()}
    for name, data in module.weight_data.items():
        assert data.dtype == np.float32
        np.testing.assert_array_equal(data, expected[name], err_msg=name)
    assert not run_pass("set_compute_dtype", module)


# ------------------------------------------------------------------------------------------ the hash

def test_content_hash_tells_dtypes_and_shapes_apart():
    from kiln.frontend.sources import content_hash

    f32 = build_tiny_model("llama")
    bf16 = content_hash(_half_model("llama", "bf16"))
    assert bf16 == content_hash(_half_model("llama", "bf16"))  # two identical modules
    assert len({content_hash(f32), bf16, content_hash(_half_model("llama", "f16"))}) == 3
    # equal bytes in another shape are another model
    wide, tall = torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        tall.weight.copy_(wide.weight.reshape(3, 2))
    assert content_hash(wide) != content_hash(tall)


# --------------------------------------------------------------------------------------- the option

# half compute itself (where kiln.api.HALF_COMPUTE offers it) is tests/test_half_compute.py's
@pytest.mark.parametrize("backend, target, dtype", [(b, t, d) for b in BACKENDS for t in ("cpu", "cuda")
                                                     for d in DTYPES if (b, t) not in kiln.api.HALF_COMPUTE])
def test_half_compute_is_refused_in_one_line(backend, target, dtype):
    with pytest.raises(ConfigError) as err:
        kiln.compile(build_tiny_model("llama"), backend=backend, target=target, dtype=dtype)
    message = str(err.value)
    assert "\n" not in message
    assert f"which the {backend} backend does not offer on {target}" in message
    assert "use dtype 'auto' or 'f32'" in message


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ConfigError, match="dtype must be one of auto, f32, f16, bf16 .* got 'f64'"):
        kiln.compile(build_tiny_model("llama"), dtype="f64")


def test_explicit_f32_compiles_as_auto_does():
    artifact = kiln.compile(_half_model("llama", "f16"), backend="reference", max_seq_len=128, dtype="f32",
                            accuracy_gate="off")
    assert artifact.manifest["options"]["dtype"] == "f32"
    assert "set_compute_dtype" in artifact.manifest["pipeline"]


def test_cli_refuses_half_compute_in_one_line(tmp_path):
    _half_model("llama", "bf16").save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    out = kiln_cli("compile", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), "--dtype", "bf16",
                   "--backend", "onnxruntime")
    lines = [line for line in out.stderr.splitlines() if line.startswith("kiln: error")]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(lines) == 1 and "dtype 'bf16' asks for bf16 compute" in lines[0], out.stderr
    assert not (tmp_path / "out").exists()
