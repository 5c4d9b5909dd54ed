"""Structured output: OpenAI's ``response_format`` (or a plain JSON schema) compiled by llguidance into a mask of
the tokens each step may take, so sampled text always parses and validates.

llguidance is imported only when a request asks for structured output (``pip install llguidance``).
"""

from __future__ import annotations

import json
import threading

import numpy as np

from kiln.ir.errors import ConfigError, KilnError

INSTALL_HINT = "pip install llguidance (or pip install 'kiln[structured]')"
# Between JSON tokens: a few spaces, or one line break and its indentation. llguidance's default allows any run
# of whitespace, and sampled at temperature 1 a small model can emit newlines until max_new_tokens (7 of 50
# SmolLM2 samples did); a schema's own "x-guidance" options still take precedence.
JSON_WHITESPACE = r"[\x20\x09]{1,64}|\r?\n[\x20\x09]{0,64}"
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}


def schema_from_request(response_format=None, json_schema=None) -> dict | None:
    """The JSON schema a request's output must satisfy (None: unconstrained), from OpenAI's ``response_format``
    (``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}, "strict": ...}}``) or the ``json_schema`` shortcut (the schema itself); refused in one line."""
    if json_schema is not None:
        if response_format is not None:
            raise ConfigError("give response_format or json_schema, not both (json_schema is the schema of "
                              "response_format={'type': 'json_schema', ...})")
        return _checked_schema(json_schema, "json_schema")
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object",
                                                                                     "json_schema"):
        raise ConfigError(f"response_format must be {{'type': 'text' | 'json_object' | 'json_schema', ...}}, got "
                          f"{_short(response_format)}")
    kind = response_format["type"]
    extra = set(response_format) - ({"type", "json_schema"} if kind == "json_schema" else {"type"})
    if extra:
        raise ConfigError(f"response_format of type {kind!r} takes no field {sorted(extra)[0]!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise ConfigError(f"response_format's json_schema must be {{'name': ..., 'schema': {{...}}, 'strict': ...}}, "
                          f"got {_short(spec)}")
    unknown = set(spec) - _JSON_SCHEMA_KEYS
    if unknown:
        raise ConfigError(f"response_format's json_schema takes {', '.join(sorted(_JSON_SCHEMA_KEYS))}, not "
                          f"{sorted(unknown)[0]!r}")
    if "name" in spec and not isinstance(spec["name"], str):
        raise ConfigError(f"response_format's json_schema.name must be a string, got {_short(spec['name'])}")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ConfigError(f"response_format's json_schema.strict must be True, False or None, got "
                          f"{_short(spec['strict'])}")
    # strict or not, the output is held to the schema: a mask cannot be half-applied
    return _checked_schema(spec["schema"], "response_format's json_schema.schema")


def _checked_schema(schema, what: str) -> dict:
    if not isinstance(schema, dict):
        raise ConfigError(f"{what} must be a JSON schema object (a dict), got {_short(schema)}")
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} is not JSON: {err}") from None
    return schema


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class GrammarCompiler:
    """One engine's bridge to llguidance: the tokenizer's vocabulary (from the artifact's tokenizer.json),
    built once on first use since reading ~50k tokens takes a fraction of a second."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        self._lock = threading.Lock()
        self._tokenizer = None

    def matcher(self, schema: dict) -> "GrammarMatcher":
        """A fresh matcher for ``schema``; a schema llguidance cannot compile is refused in one line."""
        llguidance = _import_llguidance()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema,
                                                                    defaults={"whitespace_pattern": JSON_WHITESPACE})
        except ValueError as err:
            raise ConfigError(f"the JSON schema cannot constrain generation: {_one_line(err)}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ConfigError(f"the JSON schema cannot constrain generation: {_one_line(messages[0])}")
        matcher = llguidance.LLMatcher(self._llg_tokenizer(llguidance), grammar, log_level=0)
        if matcher.is_error():
            raise ConfigError(f"the JSON schema cannot constrain generation: {_one_line(matcher.get_error())}")
        return GrammarMatcher(matcher, self.vocab_size, self.eos_token_ids)

    def _llg_tokenizer(self, llguidance):
        with self._lock:
            if self._tokenizer is None:
                from tokenizers import Tokenizer

                # the mask must cover every row of the logits and every id the tokenizer can produce
                n_vocab = max(self.vocab_size, Tokenizer.from_str(self._tokenizer_json).get_vocab_size(True))
                try:
                    self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=n_vocab,
                                                             eos_token=self.eos_token_ids or None)
                except ValueError as err:  # e.g. a tokenizer whose tokens it cannot map to bytes
                    raise ConfigError(f"llguidance cannot read this model's tokenizer for structured output: "
                                      f"{_one_line(err)}") from None
            return self._tokenizer


class GrammarMatcher:
    """One request's place in its grammar: the tokens allowed next, advanced by each sampled token.

    End-of-sequence tokens are allowed exactly when the text so far is a complete match; once the grammar can
    take nothing more (``finished``), the request ends."""

    def __init__(self, matcher, vocab_size: int, eos_token_ids):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos = np.array(eos_token_ids, dtype=np.int64)
        self._eos = self._eos[self._eos < vocab_size]

    def copy(self) -> "GrammarMatcher":
        return GrammarMatcher(self._matcher.deep_copy(), self._vocab_size, self._eos.tolist())

    def allowed_tokens(self) -> np.ndarray:
        """A ``[vocab]`` boolean mask of the tokens that keep the output a prefix of a match."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self._vocab_size].astype(bool)
        if allowed.size < self._vocab_size:  # rows past the tokenizer's vocabulary are no text at all
            allowed = np.concatenate([allowed, np.zeros(self._vocab_size - allowed.size, dtype=bool)])
        allowed[self._eos] = self._matcher.is_accepting()
        self._check()
        return allowed

    def is_eos(self, token: int) -> bool:
        return bool(np.any(self._eos == token))

    def advance(self, token: int) -> None:
        """Take a sampled token (never an end-of-sequence one: that ends the request instead)."""
        self._matcher.consume_token(int(token))
        self._check()

    @property
    def finished(self) -> bool:
        """Complete, and nothing but end-of-sequence may follow."""
        return self._matcher.is_stopped() and self._matcher.is_accepting()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise KilnError(f"structured output failed: {_one_line(self._matcher.get_error())}")


def _import_llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConfigError(f"structured output (response_format / json_schema) needs the llguidance package: "
                          f"{INSTALL_HINT}") from None
    return llguidance


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]
