"""Render a model's Jinja chat template into a prompt string, as transformers' apply_chat_template does.

Templates come with model files, so they are untrusted code: they run in Jinja's immutable sandbox, see
only plain JSON-like data and run under a time and a size budget; every failure, MemoryError and
RecursionError included, is a one-line ConfigError. Why the budgets bound every template:

* Size. Every value a template can hold (strings, lists, tuples, dicts, namespaces, integers) stays
  within the size budget, counted through nested containers with a shared reference counted each time,
  nests at most ``_MAX_DEPTH`` deep, and integers stay under ``_MAX_INT_BITS``. List, tuple and dict
  literals and ``~`` compile to checks; ``+ * ** %``, calls and filters check what they return; the few
  operations whose output is not bounded by their input (``'a' * n``, ``str.ljust(n)``, ``'%*s'``,
  ``str.format`` widths, ``replace``, ``join``, ``translate``, the ``center``, ``indent``, ``wordwrap``,
  ``batch``, ``slice``, ``pprint`` and ``tojson`` filters, ``lipsum``) are checked before they run, and
  the text of every macro, block and ``{% set %}`` body and the prompt itself are checked as they are
  joined. So every single step, hashing, comparing or printing a value included (Python's hash of a
  deeply nested tuple would overflow the C stack), costs time and memory linear in the budget.
* Time. Every ``{% for %}`` pulls its items through a deadline check, and so do every call (macros,
  recursive loops, methods) and every filter: template loops and recursion stop at the deadline. What
  remains is one step inside a filter's own Python code (``striptags`` is quadratic). For that, a
  watchdog thread raises an asynchronous exception in the rendering thread ``_GRACE_S`` after the
  deadline, and again every ``_REFIRE_S`` until the render unwinds (like Ctrl-C, it lands in whatever
  Python code the thread runs, a garbage collector's finalizer too). It fires only under its lock for
  a render not marked done; a render marks itself done first thing in its ``finally`` (no bytecode
  there can take the exception), then takes the lock and withdraws a raise that has not landed, so
  nothing fires after ``render_chat`` returns. Compiling runs under the watchdog too.

Each render keeps its budget in a thread-local, so threads can render at once.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import itertools
import json
import math
import os
import queue
import re
import threading
import time
import traceback
import types
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.lexer
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import markupsafe

# Modules Jinja imports lazily (in filters and in its error handling), imported now so that the
# watchdog's exception never lands inside an import, where it could leave an import lock held.
import jinja2.constants  # noqa: F401
import jinja2.debug  # noqa: F401
import pprint  # noqa: F401
import textwrap  # noqa: F401

from kiln.ir.errors import ConfigError

DEFAULT_TIME_BUDGET_S = 2.0
# About half a million tokens of text: far more than any context window, small enough to hold.
DEFAULT_SIZE_BUDGET_CHARS = 2 * 2**20

_MAX_TEMPLATE_CHARS = 2**20  # real templates are a few KB; the model loaders refuse larger ones too
_MAX_DEPTH = 100  # nesting of lists, dicts and namespaces a template may build or be given
_MAX_INT_BITS = 2**16  # arithmetic on such integers takes microseconds; Python prints at most 4,300 digits
_MAX_STRFTIME_CHARS = 256  # strftime may allocate 256 bytes per format character
_GRACE_S = 0.25  # the deadline checks normally stop a render; the watchdog waits this much longer
_REFIRE_S = 0.1

# Jinja compiles templates from strings under this name; it marks template frames in tracebacks.
_TEMPLATE_FILENAME = "<template>"


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    *,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    size_budget_chars: int = DEFAULT_SIZE_BUDGET_CHARS,
    **extra: Any,
) -> str:
    """Render ``messages`` (dicts with string "role" and "content") through a chat template.

    ``bos_token``/``eos_token`` are visible to the template only when given, like the
    special tokens transformers passes; ``extra`` (e.g. ``tools``, ``date_string``) is
    passed through as template variables and must be plain JSON-like data. Compiling and
    rendering take at most about ``time_budget_s`` seconds, and no string or list the
    template builds, nor the prompt, exceeds ``size_budget_chars`` characters.
    """
    if isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float)) or not (
        0 < time_budget_s < math.inf
    ):
        raise ConfigError(f"time_budget_s must be a positive number of seconds, got {time_budget_s!r}")
    if isinstance(size_budget_chars, bool) or not isinstance(size_budget_chars, int) or size_budget_chars <= 0:
        raise ConfigError(f"size_budget_chars must be a positive integer, got {size_budget_chars!r}")
    if isinstance(template, str) and len(template) > _MAX_TEMPLATE_CHARS:
        raise ConfigError(
            f"the chat template is {len(template):,} characters, more than the {_MAX_TEMPLATE_CHARS:,} kiln "
            "accepts; real templates are a few KB, check the model's tokenizer_config.json"
        )
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
    budget = _Budget(size_budget_chars, time.monotonic() + time_budget_s)
    for name, value in context.items():
        try:
            budget.measure(value)
        except _OverBudget as error:
            raise ConfigError(
                f"the chat template's input {name} is over budget: {error}; shorten it or raise size_budget_chars"
            ) from None
    _environment()  # built outside the watchdog: Jinja's lexer cache must not be interrupted mid-update
    try:
        return _render_watched(template, context, budget)
    except _TimeBudgetExceeded:
        raise ConfigError(
            f"chat template ran past its time budget of {time_budget_s:g} s; "
            "the template is hostile or broken, use a trusted one or raise time_budget_s"
        ) from None
    except _OverBudget as error:
        raise ConfigError(
            f"chat template{_template_line(error)} is over budget: {error}; "
            "the template is hostile or broken, use a trusted one or raise size_budget_chars"
        ) from None
    except ConfigError:
        raise
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
    except RecursionError as error:
        raise ConfigError(
            f"chat template{_template_line(error)} recursed too deeply; the template is hostile or broken, "
            "use a trusted one"
        ) from None
    except MemoryError as error:
        raise ConfigError(
            f"chat template{_template_line(error)} ran out of memory; use a trusted template "
            "or lower size_budget_chars"
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
    except Exception as error:  # deep nesting exhausts Jinja's parser or Python's compiler; huge numbers
        raise ConfigError(
            f"chat template could not be compiled: {type(error).__name__}: {_one_line(error)}; fix the template"
        ) from None


def _render_watched(template: str, context: dict, budget: "_Budget") -> str:
    watch = _Watch(threading.get_ident(), budget.deadline + _GRACE_S)
    try:
        _WATCHDOG.start(watch)
        compiled = compile_chat_template(template)
        # Set after compiling: Jinja folds constant filter calls while compiling, and the filters refuse
        # to run without a budget, which keeps every one of them at render time.
        _ACTIVE.budget = budget
        chunks = []
        written = 0
        for chunk in compiled.generate(context):
            written += len(chunk) or 1  # an empty chunk still costs a list slot
            if written > budget.chars:
                raise _OverBudget(f"the prompt passed the size budget of {budget.chars:,} characters")
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        watch.done = True  # first: from here on the watchdog leaves this render alone
        _ACTIVE.budget = None
        _WATCHDOG.stop(watch)


# --- budgets ------------------------------------------------------------------------------------------

class _TimeBudgetExceeded(BaseException):
    """The render ran past its deadline. A BaseException, so no `except Exception` in Jinja swallows it."""


class _OverBudget(Exception):
    """A template step would exceed the size budget; the message says which step and by how much."""


class _Budget:
    """The size budget and deadline of one render."""

    def __init__(self, chars: int, deadline: float):
        self.chars = chars
        self.deadline = deadline

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TimeBudgetExceeded()

    def check(self, size: int, what: str) -> None:
        if size > self.chars:
            raise _OverBudget(f"{what} would make {_count(size)} characters, more than the size budget "
                              f"of {self.chars:,}")

    def measure(self, value) -> int:
        """``value``'s size in characters: a string's length, a number's digits, one per container item
        plus the items' sizes (every reference counted), one for anything else. Refused past the budget."""
        if type(value) is str:  # most values, measured without a walk
            if len(value) > self.chars:
                raise _OverBudget(f"a string would be more than the size budget of {self.chars:,} characters")
            return len(value)
        return self.shape(value)[0]

    def shape(self, value) -> tuple[int, int, int]:
        """measure(value), how many items its containers hold in all, and how deep they nest."""
        try:
            return _walk(value, self.chars, 0, {})
        except _TooLarge:
            raise _OverBudget(f"a value would take more than the size budget of {self.chars:,} characters") from None

    def measured(self, value):
        self.measure(value)
        return value


class _TooLarge(Exception):
    """Internal to _walk: the walk passed its limit."""


_DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))


def _walk(value, room: int, depth: int, seen: dict) -> tuple[int, int, int]:
    """(size, items, height) of ``value`` found ``depth`` containers deep, or _TooLarge past ``room``.
    ``seen`` holds the containers walked already, so that a value built by doubling costs one step per
    level."""
    items = height = 0
    if isinstance(value, (str, bytes)):
        size = len(value)
    elif isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            raise _OverBudget(f"an integer of {value.bit_length():,} bits is larger than the {_MAX_INT_BITS:,} "
                              "allowed")
        size = value.bit_length() // 3 + 1  # its decimal digits, at least
    elif isinstance(value, float):
        size = 24  # the longest repr of a float
    elif isinstance(value, range):
        size, items, height = len(value), len(value), 1
    elif isinstance(value, (list, tuple, dict, set, frozenset, jinja2.utils.Namespace)) or type(value) in _DICT_VIEWS:
        if id(value) in seen:
            size, items, height = seen[id(value)]
        else:
            if depth >= _MAX_DEPTH:  # also ends the walk of a namespace that holds itself
                raise _OverBudget(f"values nest more than {_MAX_DEPTH} deep")
            container = value
            if isinstance(value, jinja2.utils.Namespace):
                container = object.__getattribute__(value, "_Namespace__attrs")
            size = items = len(container)
            height = 1
            members = itertools.chain.from_iterable(container.items()) if isinstance(container, dict) else container
            for member in members:
                if size > room:
                    raise _TooLarge()
                member_size, member_items, member_height = _walk(member, room - size, depth + 1, seen)
                size, items, height = size + member_size, items + member_items, max(height, member_height + 1)
            seen[id(value)] = (size, items, height)
        if depth + height > _MAX_DEPTH:
            raise _OverBudget(f"values nest more than {_MAX_DEPTH} deep")
    else:
        size = 1
    if size > room:
        raise _TooLarge()
    return size, items, height


def _count(size: int) -> str:
    # Sizes can be integers too long to print (Python refuses more than 4,300 digits).
    return f"{size:,}" if size < 10**18 else f"about 2**{size.bit_length() - 1}"


def _as_count(value) -> int:
    """A width or count argument as an int; anything else makes the operation itself fail."""
    return value if isinstance(value, int) else 0


def _text_size(budget: _Budget, value) -> int:
    """An upper bound of len(str(value)): exact for strings, generous for numbers and containers."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, float):
        return 330  # '%f' of 1e308
    # repr quotes and escapes, and names opaque objects with their address.
    return 4 * budget.measure(value) + 100


def _replaced_size(text, old, new, count) -> int:
    found = len(text) + 1 if not old else text.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * (len(new) - len(old))


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _percent_size(budget: _Budget, template, values) -> int:
    """An upper bound of len(template % values): the template, every value and every width and precision."""
    if isinstance(template, bytes):
        template = template.decode("latin-1")
    if isinstance(values, Mapping):
        values = list(values.values())
    elif not isinstance(values, tuple):
        values = [values]
    size = len(template) + sum(_text_size(budget, value) for value in values)
    for spec in _PERCENT_SPEC.finditer(template):
        for number in spec.groups():
            if number == "*":
                size += sum(abs(value) for value in values if isinstance(value, int))
            elif number:
                size += int(number)
    return size


# --- checks before operations whose output is not bounded by their input -----------------------------

def _check_padding(budget, owner, args, kwargs):
    budget.check(_as_count(args[0] if args else kwargs.get("width")), "padding a string")
    return args


def _check_expandtabs(budget, owner, args, kwargs):
    tabsize = _as_count(args[0] if args else kwargs.get("tabsize", 8))
    # A tab becomes at most tabsize spaces.
    budget.check(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * (tabsize - 1), "expandtabs()")
    return args


def _check_replace(budget, owner, args, kwargs):
    if len(args) >= 2 and all(isinstance(arg, type(owner)) for arg in args[:2]):
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        budget.check(_replaced_size(owner, args[0], args[1], count), "replace()")
    return args


def _check_join(budget, owner, args, kwargs):
    if len(args) != 1:
        return args
    items = list(args[0])  # a generator is drained here, so the method gets the list
    texts = [len(item) for item in items if isinstance(item, (str, bytes))]
    budget.check(sum(texts) + len(owner) * max(len(items) - 1, 0), "join()")
    return (items,)


def _check_translate(budget, owner, args, kwargs):
    table = args[0] if args else None
    replacements = table.values() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
    longest = max((len(text) for text in replacements if isinstance(text, str)), default=1)
    budget.check(len(owner) * longest, "translate()")
    return args


def _check_to_bytes(budget, owner, args, kwargs):
    budget.check(_as_count(args[0] if args else kwargs.get("length", 1)), "to_bytes()")
    return args


# Methods of str, bytes and int, by name.
_METHOD_CHECKS = {
    "center": _check_padding,
    "ljust": _check_padding,
    "rjust": _check_padding,
    "zfill": _check_padding,
    "expandtabs": _check_expandtabs,
    "replace": _check_replace,
    "join": _check_join,
    "translate": _check_translate,
    "to_bytes": _check_to_bytes,
}


def _check_center_filter(budget, arguments):
    budget.check(_as_count(arguments["width"]), "the center filter")


def _check_indent_filter(budget, arguments):
    text, width = arguments["s"], arguments["width"]
    per_line = len(width) if isinstance(width, str) else _as_count(width)
    lines = text.count("\n") + 1 if isinstance(text, str) else 1
    budget.check(_text_size(budget, text) + lines * per_line, "the indent filter")


def _check_wordwrap_filter(budget, arguments):
    text, wrap = arguments["s"], arguments["wrapstring"]
    size = _text_size(budget, text)
    # At most one line per character, each ended by the wrap string.
    budget.check(size + (len(wrap) if isinstance(wrap, str) else 1) * (size + 1), "the wordwrap filter")


def _check_replace_filter(budget, arguments):
    text, old, new = (str(arguments[name]) for name in ("s", "old", "new"))
    budget.check(_replaced_size(text, old, new, arguments["count"]), "the replace filter")


def _check_format_filter(budget, arguments):
    budget.check(_percent_size(budget, str(arguments["value"]), arguments["kwargs"] or arguments["args"]),
                 "the format filter")


def _check_join_filter(budget, arguments):
    items = list(arguments["value"])  # a generator is drained here, so the filter gets the list
    arguments["value"] = items
    if arguments["attribute"] is None:
        size = sum(_text_size(budget, item) for item in items)
    else:
        # An attribute's text can be longer than its item (a method's repr): allow for that.
        size = sum(4 * budget.measure(item) + 100 for item in items)
    budget.check(size + len(str(arguments["d"])) * max(len(items) - 1, 0), "the join filter")


def _check_batch_filter(budget, arguments):
    if arguments["fill_with"] is not None:
        fill = budget.measure(arguments["fill_with"]) + 1
        budget.check(_as_count(arguments["linecount"]) * fill, "the batch filter")


def _check_slice_filter(budget, arguments):
    fill = 0 if arguments["fill_with"] is None else budget.measure(arguments["fill_with"]) + 1
    budget.check(_as_count(arguments["slices"]) * (1 + fill), "the slice filter")


def _check_sum_filter(budget, arguments):
    if not isinstance(arguments["start"], (int, float)):
        # Adding lists or strings one by one takes quadratic time inside one C call.
        raise jinja2.exceptions.SecurityError("the sum filter adds numbers only")


def _check_pprint_filter(budget, arguments):
    size, items, height = budget.shape(arguments["value"])
    # Each item on a line of its own, indented to its depth.
    budget.check(size + items * (height + 3), "the pprint filter")


def _check_tojson_filter(budget, arguments):
    indent, separators = arguments["indent"], arguments["separators"]
    width = len(indent) if isinstance(indent, str) else _as_count(indent)
    separator = sum(len(s) for s in separators if isinstance(s, str)) if isinstance(separators, (list, tuple)) else 4
    size, items, height = budget.shape(arguments["value"])
    # Each item gets its separators and, with an indent, a line of its own indented to its depth. (Escaping
    # at most sextuples a character, so it is bounded by the input and checked after.)
    budget.check(size + items * (separator + 1 + width * height), "the tojson filter")


_FILTER_CHECKS = {
    "center": _check_center_filter,
    "indent": _check_indent_filter,
    "wordwrap": _check_wordwrap_filter,
    "replace": _check_replace_filter,
    "format": _check_format_filter,
    "join": _check_join_filter,
    "batch": _check_batch_filter,
    "slice": _check_slice_filter,
    "sum": _check_sum_filter,
    "pprint": _check_pprint_filter,
    "tojson": _check_tojson_filter,
}


def _bounded_filter(name: str, function):
    """``function`` checked against the render's budget: before it runs (for the filters above) and after."""
    check = _FILTER_CHECKS.get(name)
    signature = inspect.signature(function) if check else None

    @functools.wraps(function)  # keeps Jinja's pass_context/pass_eval_context marks
    def bounded(*args, **kwargs):
        budget = _budget()
        budget.tick()
        if check is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check(budget, bound.arguments)
            args, kwargs = bound.args, bound.kwargs
        return budget.measured(function(*args, **kwargs))

    return bounded


_ACTIVE = threading.local()


def _budget() -> _Budget:
    budget = getattr(_ACTIVE, "budget", None)
    if budget is None:
        # Outside a render (Jinja folding constants while compiling): leave the call to render time.
        raise jinja2.nodes.Impossible()
    return budget


# --- the environment ----------------------------------------------------------------------------------

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
    """``namespace()`` that refuses underscore names, so a template cannot plant dunders, and stays within
    the size budget as attributes are set."""

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
        _budget().measure(self)


def _check_namespace_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, >, & and ', which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
    if isinstance(format_string, str) and len(format_string) > _MAX_STRFTIME_CHARS:
        raise jinja2.exceptions.SecurityError(f"strftime_now takes at most {_MAX_STRFTIME_CHARS} characters")
    return datetime.now().strftime(format_string)


def _make_dict(*args, **kwargs):
    # A function instead of the dict type itself, so no class object reaches the template.
    return dict(*args, **kwargs)


def _lipsum(n=5, html=True, min=20, max=100):
    # Words are at most 12 characters with their separator.
    _budget().check(_as_count(n) * _as_count(max) * 12, "lipsum()")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


class _BoundedFormatter(jinja2.sandbox.SandboxedFormatter):
    """``str.format`` under the size budget: each field's width before it is padded, the total after."""

    def __init__(self, env, budget: _Budget, **kwargs):
        super().__init__(env, **kwargs)
        self._budget = budget
        self._written = 0

    def format_field(self, value, format_spec):
        widest = max((int(number) for number in re.findall(r"\d+", format_spec)), default=0)
        self._budget.check(self._written + max(widest, _text_size(self._budget, value)), "str.format()")
        text = super().format_field(value, format_spec)
        self._written += len(text)
        return text


class _BoundedEscapeFormatter(_BoundedFormatter, markupsafe.EscapeFormatter):
    """``Markup.format``: escaped fields, under the size budget."""


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles literals and ``~`` to the environment's size checks and loops to its deadline check."""

    def visit_For(self, node, frame):
        # The loop pulls its items through environment.timed, the deadline check.
        timed = jinja2.nodes.EnvironmentAttribute("timed", lineno=node.iter.lineno)
        node.iter = jinja2.nodes.Call(timed, [node.iter], [], None, None, lineno=node.iter.lineno)
        super().visit_For(node, frame)

    def visit_List(self, node, frame):
        self.write("environment.measured(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node, frame):
        self.write("environment.measured(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node, frame):
        if node.ctx != "load":  # an assignment target
            super().visit_Tuple(node, frame)
            return
        self.write("environment.measured(")
        super().visit_Tuple(node, frame)
        self.write(")")

    @jinja2.compiler.optimizeconst
    def visit_Concat(self, node, frame):
        self.write("environment.join_text((")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write("))")


class _ChatSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox with every step under the render's budget (see the module docstring).

    It also fails at the first unsafe attribute instead of rendering "": Jinja hands back an
    Undefined for a forbidden attribute and only raises when it is used further; a template
    probing for an escape is refused outright instead.
    """

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["+", "*", "**", "%"])

    @functools.cached_property
    def lexer(self):
        # Jinja looks its lexer up in a global cache on every compile; one lookup, made before any
        # render, keeps the watchdog's exception away from that cache.
        return jinja2.lexer.get_lexer(self)

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call(__self, __context, __obj, *args, **kwargs):
        budget = _budget()
        budget.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes, int)):
            check = _METHOD_CHECKS.get(getattr(__obj, "__name__", None))
            if check is not None:
                args = check(budget, owner, args, kwargs)
        return budget.measured(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        if operator == "+" and type(left) is str and type(right) is str:  # a prompt built piece by piece
            budget.check(len(left) + len(right), "'+'")
            return left + right
        sequences = (str, bytes, list, tuple)
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, sequences) and isinstance(count, int):
                    budget.check(budget.measure(sequence) * count, "'*'")
            if isinstance(left, int) and isinstance(right, int):
                _check_int_bits(left.bit_length() + right.bit_length())
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                _check_int_bits(left.bit_length() * right)
        elif operator == "+":
            if isinstance(left, sequences) and isinstance(right, sequences):
                budget.check(budget.measure(left) + budget.measure(right), "'+'")
        elif operator == "%" and isinstance(left, (str, bytes)):
            budget.check(_percent_size(budget, left, right), "'%' formatting")
        return budget.measured(self.binop_table[operator](left, right))

    def wrap_str_format(self, value):
        # Jinja's own version, with a formatter that counts.
        if not (
            isinstance(value, (types.MethodType, types.BuiltinMethodType))
            and value.__name__ in ("format", "format_map")
            and isinstance(value.__self__, str)
        ):
            return None
        template, is_format_map = value.__self__, value.__name__ == "format_map"

        def bounded_format(*args, **kwargs):
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            if isinstance(template, markupsafe.Markup):
                formatter = _BoundedEscapeFormatter(self, _budget(), escape=template.escape)
            else:
                formatter = _BoundedFormatter(self, _budget())
            return type(template)(formatter.vformat(template, args, kwargs))

        return bounded_format

    def measured(self, value):
        return _budget().measured(value)

    def timed(self, iterable):
        budget = _budget()
        for item in iterable:
            budget.tick()
            yield item

    def join_text(self, operands):
        texts = [str(operand) for operand in operands]
        _budget().check(sum(map(len, texts)), "'~'")
        return "".join(texts)

    def concat(self, chunks):
        # The body of a macro, block, call or {% set %}, joined.
        chunks = list(chunks)
        _budget().check(sum(map(len, chunks)), "a macro or block body")
        return "".join(chunks)


def _check_int_bits(bits: int) -> None:
    if bits > _MAX_INT_BITS:
        raise _OverBudget(f"an integer of about {_count(bits)} bits would be larger than the {_MAX_INT_BITS:,} "
                          "allowed")


# Left out: urlize adds its target and rel attributes to every word, so its output is not bounded by
# its input (and no chat template uses it).
_LEFT_OUT_FILTERS = {"urlize"}


@functools.lru_cache(maxsize=1)
def _environment() -> _ChatSandbox:
    environment = _ChatSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    environment.filters["tojson"] = _tojson
    filters = {}
    for name, function in environment.filters.items():
        if name not in _LEFT_OUT_FILTERS:
            # The environment is never async: the plain variant of a filter, whose signature is its own.
            plain = function.__wrapped__ if getattr(function, "jinja_async_variant", False) else function
            filters[name] = _bounded_filter(name, plain)
    environment.filters = filters
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _SafeNamespace
    environment.globals["dict"] = _make_dict
    environment.globals["lipsum"] = _lipsum
    environment.lexer  # noqa: B018 - cached now, outside any render
    return environment


# --- the watchdog -------------------------------------------------------------------------------------

# A private prototype, so that no other library's argtypes for this function are touched.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


class _Watch:
    """One render under the watchdog."""

    def __init__(self, thread_id: int, fire_at: float):
        self.thread_id = thread_id
        self.fire_at = fire_at
        self.done = False
        self.fired = False


class _Watchdog:
    """A daemon thread raising _TimeBudgetExceeded in renders still running past their deadline.

    Only plain C locks and queues are used on the rendering side, so the exception, landing between any
    two bytecodes there, cannot leave a lock held.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._wakeups = queue.SimpleQueue()
        self._watches: set[_Watch] = set()
        self._wakes_at = math.inf  # when the thread looks at the watches next
        self._thread = None

    def start(self, watch: _Watch) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kiln-chat-template-watchdog", daemon=True)
                self._thread.start()
            self._watches.add(watch)
            wake = watch.fire_at < self._wakes_at
            if wake:
                self._wakes_at = watch.fire_at
        if wake:  # most renders end long before the watches already waited for
            self._wakeups.put(None)

    def stop(self, watch: _Watch) -> None:
        """Called after ``watch.done`` is set: once this holds the lock, no raise can come; withdraw one
        that was made but has not landed yet."""
        with self._lock:
            self._watches.discard(watch)
            if watch.fired:
                _set_async_exc(watch.thread_id, ctypes.py_object())

    def _run(self) -> None:
        timeout = None
        while True:
            try:
                self._wakeups.get(timeout=timeout)
            except queue.Empty:
                pass
            with self._lock:
                now = time.monotonic()
                for watch in list(self._watches):
                    if watch.done:  # its render was interrupted before it could stop the watch
                        self._watches.discard(watch)
                    elif watch.fire_at <= now:
                        _set_async_exc(watch.thread_id, _TimeBudgetExceeded)
                        watch.fired = True
                        # Again later, in case the exception landed where it was swallowed (a __del__).
                        watch.fire_at = now + _REFIRE_S
                self._wakes_at = min((watch.fire_at for watch in self._watches), default=math.inf)
                timeout = None if self._wakes_at == math.inf else max(self._wakes_at - now, 0.0)


_WATCHDOG = _Watchdog()
# A forked child has no watchdog thread: give it a fresh watchdog.
os.register_at_fork(after_in_child=lambda: _WATCHDOG.__init__())


# --- inputs and messages ------------------------------------------------------------------------------

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


def _plain(value, where: str, depth: int = 0):
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
    if depth >= _MAX_DEPTH and isinstance(value, (list, tuple, Mapping)):
        raise ConfigError(f"{where} nests lists and dicts more than {_MAX_DEPTH} deep (or holds itself); "
                          "a chat template takes plain JSON-like data")
    if isinstance(value, (list, tuple)):
        return [_plain(item, where, depth + 1) for item in value]
    if isinstance(value, Mapping):
        copied = {}
        for key, item in value.items():
            if type(key) is not str:
                raise ConfigError(f"{where} must use string keys for the chat template, found key {key!r}")
            copied[key] = _plain(item, where, depth + 1)
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


def _one_line(text, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    # A closing period goes (not an ellipsis) so the message can continue after a semicolon.
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text
