"""Fuzz target: render_chat on an arbitrary chat template, under small time and size budgets.

The input is the template (UTF-8, undecodable bytes replaced); the bytes after a NUL, when there is one,
are the message contents instead of a fixed conversation, split at 0x01 with roles alternating
user/assistant. Only a one-line ConfigError may escape; a render must return within a few seconds and
its prompt within the size budget.
"""

from __future__ import annotations

import time

from kiln.ir.errors import ConfigError, KilnError
from kiln.runtime.chat_template import render_chat

TIME_BUDGET_S = 0.25
SIZE_BUDGET_CHARS = 2**18
# The watchdog stops a render half a second after its deadline at most; the rest allows for a loaded
# machine (and for atheris's instrumentation).
RETURN_WITHIN_S = 5.0

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! 👋 {{ braces }}"},
    {"role": "assistant", "content": "  Hello.\n"},
    {"role": "user", "content": "What is 2+2?"},
]


def check(data: bytes) -> None:
    template, separator, contents = data.partition(b"\0")
    messages = CONVERSATION
    if separator:
        messages = [
            {"role": ("user", "assistant")[index % 2], "content": part.decode("utf-8", "replace")}
            for index, part in enumerate(contents.split(b"\x01")[:16])
        ]
    start = time.monotonic()
    try:
        prompt = render_chat(
            template.decode("utf-8", "replace"), messages, bos_token="<s>", eos_token="</s>",
            time_budget_s=TIME_BUDGET_S, size_budget_chars=SIZE_BUDGET_CHARS,
        )
    except KilnError as error:
        assert type(error) is ConfigError, f"render_chat raised {type(error).__name__}, not ConfigError"
        assert "\n" not in str(error), f"a ConfigError of more than one line: {error!r}"
        prompt = ""
    elapsed = time.monotonic() - start
    assert elapsed < RETURN_WITHIN_S, f"render_chat took {elapsed:.1f} s with a {TIME_BUDGET_S} s budget"
    assert len(prompt) <= SIZE_BUDGET_CHARS, f"a prompt of {len(prompt):,} characters passed the size budget"


if __name__ == "__main__":
    import harness

    harness.main(check, "chat_template")
