"""Structured output (issue 13, point 4): response_format / json_schema held by llguidance's token mask, checked
with jsonschema (the independent validator) and json; refusals in one line.

The SmolLM2 tests (a real vocabulary for llguidance) compile the model once for the module and are slow.
"""

import json
import sys

import pytest

import kiln
from kiln.ir.errors import ConfigError
from kiln.runtime.grammar import schema_from_request

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                          "role": {"enum": ["admin", "editor", "viewer"]}},
          "required": ["name", "age", "role"], "additionalProperties": False}

# objects in objects, arrays, enums, numbers with bounds, a pattern, required and optional fields
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}


# the request's fields -------------------------------------------------------------------------------------------
def test_response_format_reads_openai_shapes():
    assert schema_from_request() is None
    assert schema_from_request({"type": "text"}) is None
    assert schema_from_request({"type": "json_object"}) == {"type": "object"}
    wrapped = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert schema_from_request(wrapped) is PERSON
    assert schema_from_request(json_schema=PERSON) is PERSON


@pytest.mark.parametrize("response_format,json_schema,expected", [
    ({"type": "xml"}, None, "response_format must be {'type': 'text' | 'json_object' | 'json_schema', ...}"),
    ("json", None, "response_format must be"),
    ({"type": "json_object", "schema": PERSON}, None, "of type 'json_object' takes no field 'schema'"),
    ({"type": "json_schema"}, None, "json_schema must be {'name': ..., 'schema': {...}"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON, "strct": True}}, None, "not 'strct'"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON, "strict": "yes"}}, None, "strict must be True"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, None, "schema must be a JSON schema object"),
    ({"type": "json_object"}, PERSON, "give response_format or json_schema, not both"),
    (None, {"type": "object", "default": float("nan")}, "json_schema is not JSON"),
])
def test_bad_response_formats_are_refused_in_one_line(response_format, json_schema, expected):
    with pytest.raises(ConfigError) as err:
        schema_from_request(response_format, json_schema)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    """The tiny Llama with its word-level tokenizer: enough to reach the grammar's import and its refusals."""
    from tiny_models import save_tiny_checkpoint

    directory = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_tiny_checkpoint(directory)
    return kiln.load(kiln.compile(str(directory), backend="reference", max_seq_len=32))


def test_without_llguidance_a_structured_request_says_what_to_install(tiny_engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(ConfigError) as err:
        tiny_engine.submit("w7 w8", max_new_tokens=4, response_format={"type": "json_object"})
    assert "pip install llguidance" in str(err.value) and "\n" not in str(err.value)
    assert len(tiny_engine.generate("w7 w8", max_new_tokens=2, ignore_eos=True).token_ids) == 2


def test_a_schema_or_tokenizer_llguidance_cannot_use_is_refused_in_one_line(tiny_engine):
    pytest.importorskip("llguidance", reason="llguidance compiles the schema (pip install llguidance)")
    with pytest.raises(ConfigError) as err:
        tiny_engine.submit("w7 w8", max_new_tokens=4, json_schema={"type": "string", "format": "no-such-format"})
    assert "the JSON schema cannot constrain generation" in str(err.value) and "no-such-format" in str(err.value)
    assert "\n" not in str(err.value)
    # a word-level tokenizer has no byte decoder for llguidance to map its tokens to text with
    with pytest.raises(ConfigError) as err:
        tiny_engine.submit("w7 w8", max_new_tokens=4, json_schema=PERSON)
    assert "llguidance cannot read this model's tokenizer" in str(err.value) and "\n" not in str(err.value)


# SmolLM2 ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llguidance", reason="structured output needs llguidance (pip install llguidance)")
    from smollm2 import smollm2_source

    smollm2_source()  # skips when SmolLM2 is not installed
    return kiln.load(kiln.compile("smollm2", backend="tvm", max_seq_len=256, max_num_seqs=8, activations="float"),
                     max_running=8)


@pytest.mark.slow
def test_fifty_samples_at_temperature_one_parse_and_validate(smollm2):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is the independent validator")
    requests = smollm2.submit_n("A user record in JSON:\n", 50, temperature=1.0, seed=0, max_new_tokens=200,
                                json_schema=NESTED)
    results = [r.result() for r in requests]
    assert [r.finish_reason for r in results] == ["stop"] * 50  # every one completed its object
    for result in results:
        jsonschema.validate(json.loads(result.text), NESTED)
    assert len({r.text for r in results}) > 40  # seeds seed..seed+49: the samples differ


@pytest.mark.slow
def test_constrained_greedy_equals_unconstrained_greedy_when_that_already_validates(smollm2):
    """A few-shot prompt whose unconstrained greedy continuation starts with a JSON object that validates: the
    mask never removes the argmax, so the constrained tokens are exactly that object's tokens, and then it
    stops. The wrapped response_format and the json_schema shortcut give the same output."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is the independent validator")
    prompt = ('Alice, 30, admin\n{"name": "Alice", "age": 30, "role": "admin"}\n'
              'Bob, 25, viewer\n{"name": "Bob", "age": 25, "role": "viewer"}\nCarol, 41, editor\n')
    free = smollm2.generate(prompt, max_new_tokens=30, ignore_eos=True)
    value, end = json.JSONDecoder().raw_decode(free.text)
    jsonschema.validate(value, PERSON)  # the premise: unconstrained greedy already satisfies the schema
    held = smollm2.generate(prompt, max_new_tokens=30, json_schema=PERSON)
    assert held.text == free.text[:end] and held.finish_reason == "stop"
    assert held.token_ids == free.token_ids[:len(held.token_ids)]
    wrapped = smollm2.generate(prompt, max_new_tokens=30, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert wrapped.token_ids == held.token_ids
    assert isinstance(json.loads(smollm2.generate(prompt, max_new_tokens=30,
                                                  response_format={"type": "json_object"}).text), dict)


@pytest.mark.slow
def test_end_of_sequence_only_once_the_grammar_is_complete(smollm2):
    """A +100 bias on EOS ends an unconstrained request at once; held to {"type": "integer"}, EOS is masked
    until a number has been written, so the output is a number."""
    eos = smollm2.tokenizer.eos_token_ids[0]
    free = smollm2.generate("The answer is ", max_new_tokens=10, logit_bias={eos: 100.0})
    assert free.token_ids == [] and free.finish_reason == "stop"
    held = smollm2.generate("The answer is ", max_new_tokens=10, logit_bias={eos: 100.0},
                            json_schema={"type": "integer"})
    assert held.finish_reason == "stop" and isinstance(json.loads(held.text), int)
