"""The generation engine: loads an artifact and generates text with prefill, decode and the KV cache.

Imports numpy, tokenizers, jinja2 and the backend's runtime only; never torch,
kiln.frontend or kiln.passes, so an artifact runs on a machine without them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from kiln.ir.errors import ConfigError

from .artifact import ArtifactInfo, open_artifact
from .chat_template import render_chat
from .detokenize import IncrementalDetokenizer
from .pages import PageManager
from .sampling import Sampler, SamplingParams
from .stopping import StopStringMatcher


@dataclass
class GenerationResult:
    text: str
    token_ids: list
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    stats: dict = field(default_factory=dict)
    logits: np.ndarray | None = None
    prompt_token_ids: list = field(default_factory=list)


class Tokenizer:
    """encode / decode over the artifact's tokenizer.json, with its special tokens."""

    def __init__(self, path: str, config: dict):
        from tokenizers import Tokenizer as HFTokenizer

        self.backend = HFTokenizer.from_file(path)
        self.bos_token_id = config.get("bos_token_id")
        self.eos_token_ids = list(config.get("eos_token_ids") or [])
        self.bos_token = config.get("bos_token")
        self.eos_token = config.get("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()


class Engine:
    """Runs one compiled artifact. Build with :func:`kiln.load`."""

    def __init__(self, info: ArtifactInfo, **backend_options):
        from kiln.backends import load_executor

        self.info = info
        manifest = info.manifest
        self.manifest = manifest
        self.kv_plan = manifest["kv_cache"]
        self.max_seq_len = self.kv_plan["max_seq_len"]
        tok = manifest.get("tokenizer")
        self.tokenizer = Tokenizer(info.file(tok["file"]), tok) if tok else None
        template = manifest.get("chat_template")
        self.chat_template = None
        if template:
            with open(info.file(template), encoding="utf-8") as f:
                self.chat_template = f.read()
        self.executor = load_executor(info, **backend_options)
        # prefill computing only the last token's logits, when the backend compiled it
        self._prefill_for_generation = "prefill_last" if self.executor.has_function("prefill_last") else "prefill"
        self.pages = PageManager(self.kv_plan["num_pages"], self.kv_plan["page_size"], self.kv_plan["pages_per_seq"])

    @classmethod
    def from_path(cls, path: str, **backend_options) -> "Engine":
        return cls(open_artifact(path), **backend_options)

    # low level ----------------------------------------------------------------
    def _step(self, function: str, seq_ids: list, tokens: np.ndarray) -> np.ndarray:
        """Run prefill/decode for ``tokens[len(seq_ids), n]`` appended to each sequence."""
        n = tokens.shape[1]
        positions = np.empty(tokens.shape, dtype=np.int64)
        for row, seq_id in enumerate(seq_ids):
            start = self.pages.advance(seq_id, n)
            positions[row] = np.arange(start, start + n)
        table = self.pages.page_table(seq_ids)
        return self.executor.run(function, tokens.astype(np.int64), positions, table)

    def _prompt_ids(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this artifact has no tokenizer: pass a list of token ids instead of text")
            return self.tokenizer.encode(prompt)
        ids = [int(i) for i in prompt]
        vocab = self.manifest["model"].get("vocab_size")
        if not ids:
            raise ConfigError("the prompt is empty: pass at least one token")
        if vocab and (min(ids) < 0 or max(ids) >= vocab):
            raise ConfigError(f"token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        return ids

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of ``token_ids``: numpy [len, vocab], via prefill."""
        ids = self._prompt_ids(token_ids)
        if len(ids) > self.max_seq_len:
            raise ConfigError(f"{len(ids)} tokens exceed the compiled maximum of {self.max_seq_len}")
        seq = self.pages.add_sequence()
        try:
            return self._step("prefill", [seq], np.asarray([ids]))[0]
        finally:
            self.pages.remove_sequence(seq)

    # generation -----------------------------------------------------------------
    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are generated (same arguments as :meth:`generate`)."""
        result_holder: list = []
        yield from self._generate(prompt, result_holder, **kwargs)

    def generate(self, prompt, *, return_logits: bool = False, **kwargs) -> GenerationResult:
        holder: list = []
        for _ in self._generate(prompt, holder, return_logits=return_logits, **kwargs):
            pass
        return holder[0]

    def chat(self, messages: list, *, add_generation_prompt: bool = True, stream: bool = False, **kwargs):
        """Apply the model's chat template (in jinja2's sandbox) and generate the reply."""
        prompt = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if self.tokenizer.bos_token_id is not None and self.manifest["tokenizer"].get("add_bos_token") and \
                (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids = [self.tokenizer.bos_token_id] + ids
        return self.stream(ids, **kwargs) if stream else self.generate(ids, **kwargs)

    def render_chat(self, messages: list, add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ConfigError("this model has no chat template; use generate() with a plain prompt")
        tok = self.tokenizer
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tok.bos_token, eos_token=tok.eos_token)

    def _generate(self, prompt, holder: list, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                  seed: int | None = None, stop=None, ignore_eos: bool = False,
                  return_logits: bool = False) -> Iterator[str]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed, max_new_tokens=max_new_tokens,
                                stop=tuple(stop) if isinstance(stop, (list, tuple)) else (stop or ()),
                                ignore_eos=ignore_eos).validate()
        ids = self._prompt_ids(prompt)
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise ConfigError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) is "
                              f"{len(ids) + max_new_tokens}, more than the compiled maximum of "
                              f"{self.max_seq_len}; shorten the prompt, lower max_new_tokens or recompile "
                              f"with a larger --max-seq-len")
        sampler = Sampler(params)
        eos = set() if ignore_eos or self.tokenizer is None else set(self.tokenizer.eos_token_ids)
        detok = IncrementalDetokenizer(self.tokenizer.backend) if self.tokenizer else None
        matcher = StopStringMatcher(params.stop) if params.stop else None
        new_ids: list = []
        kept_logits: list = []
        text_parts: list = []
        finish = "length"
        seq = self.pages.add_sequence()
        try:
            start = time.perf_counter()
            logits = self._step(self._prefill_for_generation, [seq], np.asarray([ids]))[0, -1]
            prefill_time = time.perf_counter() - start
            decode_start = time.perf_counter()
            decode_calls = 0
            history = list(ids)
            while True:
                if return_logits:
                    kept_logits.append(np.array(logits, dtype=np.float32))
                token = sampler.sample(logits, history)
                if token in eos:
                    finish = "stop"
                    break
                new_ids.append(token)
                history.append(token)
                piece = detok.push(token) if detok else ""
                if matcher is not None and piece:
                    piece, stopped = matcher.feed(piece)
                    if piece:
                        text_parts.append(piece)
                        yield piece
                    if stopped:
                        finish = "stop"
                        break
                elif piece:
                    text_parts.append(piece)
                    yield piece
                if len(new_ids) >= max_new_tokens:
                    break
                logits = self._step("decode", [seq], np.asarray([[token]]))[0, -1]
                decode_calls += 1
            decode_time = time.perf_counter() - decode_start
        finally:
            self.pages.remove_sequence(seq)
        if finish != "stop" or matcher is None or not matcher.stopped:
            tail = detok.flush() if detok else ""
            if matcher is not None:
                tail, _ = matcher.feed(tail) if tail else ("", False)
                tail += matcher.flush() if not matcher.stopped else ""
            if tail:
                text_parts.append(tail)
                yield tail
        stats = {
            "prompt_tokens": len(ids), "new_tokens": len(new_ids),
            "prefill_seconds": prefill_time, "decode_seconds": decode_time,
            "prefill_tokens_per_s": len(ids) / prefill_time if prefill_time > 0 else float("inf"),
            "decode_steps": decode_calls,
            "decode_tokens_per_s": decode_calls / decode_time if decode_time > 0 and decode_calls else 0.0,
        }
        holder.append(GenerationResult(text="".join(text_parts), token_ids=new_ids, finish_reason=finish,
                                       stats=stats, logits=np.stack(kept_logits) if return_logits and kept_logits
                                       else (np.zeros((0, 0), np.float32) if return_logits else None),
                                       prompt_token_ids=ids))
