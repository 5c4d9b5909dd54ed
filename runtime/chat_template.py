"""Render a model's Jinja chat template into a prompt string, as transformers' apply_chat_template does.

Templates come with model files, so they are untrusted code: they run in Jinja's immutable
sandbox, see only plain JSON-like data, and every failure becomes a one-line ConfigError.
"""

from __future__ import annotations

import functools
import json
import traceback
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from kiln.ir.errors import ConfigError

# Jinja compiles templates from strings under this name; it marks template frames in tracebacks.
_TEMPLATE_FILENAME = "<template>"


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` (dicts with string "role" and "content") through a chat template.

    ``bos_token``/``eos_token`` are visible to the template only when given, like the
    special tokens transformers passes; ``extra`` (e.g. ``tools``, ``date_string``) is
    passed through as template variables and must be plain JSON-like data.
    """
    compiled = compile_chat_template(template)
    context: dict[str, Any] = {
        "messages": _checked_messages(messages),
        # transformers always defines these two, so templates testing `is defined` agree.
        "tools": None,
        "documents": None,
        "add_generation_prompt": bool(add_generation_prompt),
    }
    if bos_token is not None:
        context["bos_token"] = _plain(bos_token, "bos_token")
    if eos_token is not None:
        context["eos_token"] = _plain(eos_token, "eos_token")
    for name, value in extra.items():
        context[name] = _plain(value, name)
    try:
        return compiled.render(context)
    except jinja2.exceptions.SecurityError as error:
        raise ConfigError(
            f"chat template{_template_line(error)} tried an operation the sandbox forbids: "
            f"{_one_line(error)}; the template is unsafe, use a trusted one"
        ) from None
    except jinja2.exceptions.TemplateError as error:
        # raise_exception() and undefined-variable errors land here.
        raise ConfigError(
            f"chat template{_template_line(error)} failed: {_one_line(error)}; "
            "check the messages against what the template expects"
        ) from None
    except Exception as error:  # the template's own expressions (e.g. str + int) raise plain Python errors
        raise ConfigError(
            f"chat template{_template_line(error)} failed with {type(error).__name__}: {_one_line(error)}"
        ) from None


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a template once; later calls with the same text return the same object."""
    if not isinstance(template, str):
        raise ConfigError(f"a chat template must be a string, got {type(template).__name__}")
    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ConfigError(
            f"chat template line {error.lineno} has a syntax error: {_one_line(error.message)}; fix the template"
        ) from None
    except jinja2.exceptions.TemplateError as error:
        raise ConfigError(f"chat template could not be compiled: {_one_line(error)}") from None


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' ``{% generation %}...{% endgeneration %}`` and renders its body.

    transformers uses the tag to mark assistant text for training masks; for inference
    only the text matters.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so a template cannot plant dunders."""

    def __init__(*args, **kwargs):
        # Jinja's Namespace takes self positionally so that `namespace(self=1)` works.
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, >, & and ', which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
    return datetime.now().strftime(format_string)


def _make_dict(*args, **kwargs):
    # A function instead of the dict type itself, so no class object reaches the template.
    return dict(*args, **kwargs)


class _StrictSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, failing at the first unsafe attribute instead of rendering "".

    Jinja hands back an Undefined for a forbidden attribute and only raises when it is
    used further; a template probing for an escape is refused outright instead.
    """

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    environment = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _SafeNamespace
    environment.globals["dict"] = _make_dict
    return environment


def _checked_messages(messages) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)):
        raise ConfigError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if (
            not isinstance(message, Mapping)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise ConfigError(
                f"chat message {index} must be a dict with string 'role' and 'content', "
                f"got {_one_line(repr(message))[:200]}"
            )
        checked.append(_plain(message, f"chat message {index}"))
    return checked


def _plain(value, where: str):
    """A fresh copy of value built only from JSON types; anything else is refused.

    Objects with methods (numpy arrays, custom classes) would hand the template methods
    the sandbox knows nothing about, and a fresh copy keeps the caller's data untouched.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars) are cut back to the base type and its methods.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    if isinstance(value, Mapping):
        copied = {}
        for key, item in value.items():
            if type(key) is not str:
                raise ConfigError(f"{where} must use string keys for the chat template, found key {key!r}")
            copied[key] = _plain(item, where)
        return copied
    raise ConfigError(
        f"{where} must hold only str, numbers, bools, None, lists and dicts for the chat template, "
        f"found {type(value).__name__}"
    )


def _template_line(error: BaseException) -> str:
    """' line N' of the template statement that raised, when the traceback shows it."""
    lineno = getattr(error, "lineno", None)
    if lineno is None:
        for frame in reversed(traceback.extract_tb(error.__traceback__)):
            if frame.filename == _TEMPLATE_FILENAME:
                lineno = frame.lineno
                break
    return f" line {lineno}" if lineno else ""


def _one_line(text) -> str:
    text = " ".join(str(text).split())
    # A closing period goes (not an ellipsis) so the message can continue after a semicolon.
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text
