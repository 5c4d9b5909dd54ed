"""`kiln chat` on a terminal (a pty): each reply of a multi-turn conversation is transformers' greedy reply to
the same conversation (its chat template and tokenizer), and Engine.chat's; an empty line, /exit or Ctrl-D
ends the chat with status 0. The tiny Llama with the word-level tokenizer and its chat template."""

import os
import select
import subprocess
import sys
import time

import pytest
import torch

import kiln

from tiny_models import save_tiny_checkpoint, tiny_model, transformers_tokenizer

NEW_TOKENS = 6
pty = pytest.importorskip("pty", reason="kiln chat's terminal test needs a POSIX pty")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(artifact path, engine, transformers tokenizer)."""
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_tiny_checkpoint(directory)
    path = kiln.compile(str(directory), backend="reference", max_seq_len=96,
                        output=tmp_path_factory.mktemp("art") / "chat.kiln").path
    return path, kiln.load(path), transformers_tokenizer(directory)


def hf_reply(hf_tokenizer, messages) -> str:
    """transformers' greedy reply: the chat template applied, generation up to the EOS or NEW_TOKENS."""
    ids = list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    with torch.no_grad():
        out = tiny_model("llama").generate(torch.as_tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                           eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return hf_tokenizer.decode(new, skip_special_tokens=True)


class Terminal:
    """`kiln chat` with a pty as its standard input and output (stderr apart)."""

    def __init__(self, *args):
        self.fd, child = pty.openpty()
        self.process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "chat", *args], stdin=child,
                                        stdout=child, stderr=subprocess.PIPE, close_fds=True)
        os.close(child)
        self.pending = b""

    def read_until(self, marker: bytes, timeout: float = 120) -> str:
        """What the terminal shows up to ``marker`` (consumed), with the pty's CR LF as LF."""
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} within {timeout} s; the terminal shows {self.pending!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the child has closed the terminal
                    chunk = b""
                assert chunk, f"the terminal closed before {marker!r}; it shows {self.pending!r}"
                self.pending += chunk
        shown, _, self.pending = self.pending.partition(marker)
        return shown.decode().replace("\r\n", "\n")

    def say(self, line: str) -> str:
        """Type ``line`` at the "> " prompt; returns the reply printed before the next prompt."""
        os.write(self.fd, line.encode() + b"\n")
        echoed, reply = self.read_until(b"\r\n> ").split("\n", 1)
        assert echoed == line
        return reply

    def finish(self, timeout: float = 60) -> tuple:
        """(exit status, stderr) once the chat ends."""
        status = self.process.wait(timeout)
        return status, self.process.stderr.read().decode()

    def close(self) -> None:
        if self.process.poll() is None:  # a failed test left the chat waiting for input
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()
        os.close(self.fd)


@pytest.fixture
def chat():
    """Starts `kiln chat ARGS` on a terminal; every one is ended after the test, whatever happened."""
    terminals = []

    def start(*args):
        terminals.append(Terminal(*args))
        return terminals[-1]

    yield start
    for terminal in terminals:
        terminal.close()


def test_multi_turn_replies_match_transformers_and_an_empty_line_ends(chat_model, chat):
    path, engine, hf_tokenizer = chat_model
    terminal = chat(str(path), "-n", str(NEW_TOKENS))
    assert terminal.read_until(b"> ") == ""
    messages = []
    for line in ("w7 w8 w9", "w30 w31 w32 w33", "w100"):
        reply = terminal.say(line)
        messages.append({"role": "user", "content": line})
        assert reply == hf_reply(hf_tokenizer, messages), (messages, reply)
        assert reply == engine.chat(messages, max_new_tokens=NEW_TOKENS).text
        assert reply.strip(), "a reply with no text would compare nothing"
        messages.append({"role": "assistant", "content": reply})
    os.write(terminal.fd, b"\n")
    status, stderr = terminal.finish()
    assert status == 0, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("ending", [b"\x04", b"/exit\n"], ids=["ctrl-d", "exit"])
def test_ctrl_d_or_exit_ends_the_chat(chat_model, chat, ending):
    path, _, hf_tokenizer = chat_model
    terminal = chat(str(path), "-n", str(NEW_TOKENS), "--system", "w40 w41")
    terminal.read_until(b"> ")
    reply = terminal.say("w7 w8 w9")
    assert reply.strip() and reply == hf_reply(hf_tokenizer, [{"role": "system", "content": "w40 w41"},
                                                              {"role": "user", "content": "w7 w8 w9"}])
    os.write(terminal.fd, ending)
    status, stderr = terminal.finish()
    assert status == 0, stderr
    assert "Traceback" not in stderr


def test_a_turn_that_cannot_run_is_refused_and_the_chat_goes_on(chat_model, chat):
    """At a terminal a turn too long for the compiled maximum is refused in one line and left out of the
    conversation: the next reply is transformers' reply to a conversation without it."""
    path, _, hf_tokenizer = chat_model
    terminal = chat(str(path), "-n", str(NEW_TOKENS))
    terminal.read_until(b"> ")
    os.write(terminal.fd, " ".join(f"w{i}" for i in range(120)).encode() + b"\n")
    terminal.read_until(b"\r\n> ")
    reply = terminal.say("w7 w8 w9")
    assert reply == hf_reply(hf_tokenizer, [{"role": "user", "content": "w7 w8 w9"}])
    os.write(terminal.fd, b"\n")
    status, stderr = terminal.finish()
    errors = stderr.splitlines()
    assert status == 0 and len(errors) == 1 and "more than the compiled maximum of 96" in errors[0], stderr


@pytest.mark.parametrize("line, message", [
    (" ".join(f"w{i}" for i in range(120)).encode(), "more than the compiled maximum of 96"),
    (b"caf\xe9", "that line is not UTF-8 text"),
], ids=["too long", "not UTF-8"])
def test_a_script_feeding_a_bad_turn_gets_status_2(chat_model, line, message):
    path, _, _ = chat_model
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "chat", str(path), "-n", "2"], input=line + b"\n",
                         capture_output=True, timeout=120)
    lines = out.stderr.decode().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
