"""`kiln serve` driven by real clients: the official openai package (completions and chat, streaming and not, seeds,
stop strings, errors as its exception types) and raw HTTP through httpx (bad JSON, wrong types, limits, auth, the
queue bound, a client leaving mid-stream, /metrics parsed by prometheus_client). What the server generates is
compared with Engine.generate / chat / stream on a second engine of the same artifact, token for token."""

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kiln

pytest.importorskip("fastapi", reason="kiln serve needs the serve extra (fastapi, uvicorn, prometheus_client)")
openai = pytest.importorskip("openai", reason="the server tests drive it with the official openai client")
httpx = pytest.importorskip("httpx", reason="the raw HTTP tests use httpx")
uvicorn = pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kiln.runtime.engine import Engine  # noqa: E402
from kiln.server import create_app, listening_socket  # noqa: E402

from tiny_models import save_tiny_checkpoint  # noqa: E402

MAX_SEQ_LEN = 1024  # long enough that a 1000-token generation outlasts the requests a test sends beside it
PROMPT = "w7 w8 w9 w10"
CHAT = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w7 w8"}]  # EOS after 165 tokens
LONG = 1000  # tokens of a generation that is still running while the test acts (1.3 ms a token on reference)


class ServerThread:
    """A kiln app on uvicorn in a thread, on a free port of 127.0.0.1; stopped by close()."""

    def __init__(self, app):
        sock = listening_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def client(self, api_key: str = "unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_tiny_checkpoint(directory)
    return kiln.compile(str(directory), backend="reference", max_seq_len=MAX_SEQ_LEN,
                        output=tmp_path_factory.mktemp("art") / "tiny.kiln").path


@pytest.fixture(scope="module")
def reference(artifact):
    """A second engine on the artifact: what the server answers must be what it generates."""
    with kiln.load(artifact) as engine:
        yield engine


@pytest.fixture(scope="module")
def served(artifact):
    with kiln.load(artifact) as engine:
        server = ServerThread(create_app(engine, model_name="tiny"))
        server.engine = engine
        yield server
        server.close()


@pytest.fixture(scope="module")
def client(served):
    return served.client()


def metrics(url: str, headers=None) -> dict:
    """/metrics as {(name, labels...): value}, read by prometheus_client's own parser."""
    response = httpx.get(url + "/metrics", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return values


def assert_openai_error(response, status: int, param):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


# the openai client ------------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].owned_by == "kiln"
    assert models[0].model_extra["max_model_len"] == MAX_SEQ_LEN
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_greedy_completion_equals_engine_generate(client, reference):
    expected = reference.generate(PROMPT, max_new_tokens=12, temperature=0.0)
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.model == "tiny"
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason == "length"
    assert completion.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert completion.usage.completion_tokens == len(expected.token_ids) == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12
    # streamed: one chunk per token, the engine's own pieces, then the finish reason and usage
    pieces = list(reference.stream(PROMPT, max_new_tokens=12, temperature=0.0))
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert texts == pieces and len(texts) == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_takes_token_ids_and_batches_of_prompts(client, reference):
    ids = [1, 9, 33, 40]
    prompts = [PROMPT, "w50 w51"]
    completion = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert completion.choices[0].text == reference.generate(ids, max_new_tokens=6).text
    completion = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    expected = reference.generate(prompts, max_new_tokens=6)
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.text for c in completion.choices] == [r.text for r in expected]
    assert completion.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in expected)


def test_greedy_chat_equals_engine_chat(client, reference):
    expected = reference.chat(CHAT, max_new_tokens=10, temperature=0.0)
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(reference.chat_prompt(CHAT))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    # max_completion_tokens is the newer name of the same limit
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=10, temperature=0)
    assert again.choices[0].message.content == expected.text
    pieces = list(reference.chat(CHAT, max_new_tokens=10, temperature=0.0, stream=True))
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices[0].delta.content]
    assert contents == pieces and len(contents) == 10
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_without_a_limit_runs_to_the_end_of_the_context(client, reference):
    """OpenAI's default max_tokens for chat: what the context has room for (here the model's EOS or 1024)."""
    prompt = reference.chat_prompt(CHAT)
    expected = reference.generate(prompt, max_new_tokens=MAX_SEQ_LEN - len(prompt))
    reply = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_seeded_sampling_equals_the_engine(client, reference):
    for seed in (7, 8):
        expected = reference.generate(PROMPT, max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95, seed=seed)
        completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0.9,
                                               top_p=0.95, seed=seed, extra_body={"top_k": 20})
        assert completion.choices[0].text == expected.text
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=1.2, seed=3,
                                           extra_body={"min_p": 0.05, "repetition_penalty": 1.3})
    expected = reference.chat(CHAT, max_new_tokens=10, temperature=1.2, seed=3, min_p=0.05, repetition_penalty=1.3)
    assert reply.choices[0].message.content == expected.text


def test_stop_strings(client, reference):
    greedy = reference.generate(PROMPT, max_new_tokens=12).text.split()
    stop = greedy[4]  # a word the greedy continuation reaches
    expected = reference.generate(PROMPT, max_new_tokens=12, stop=[stop])
    assert expected.finish_reason == "stop" and stop not in expected.text
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert completion.choices[0].text == expected.text and completion.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_usage_counts_prompt_tokens_from_the_prefix_cache(served, client):
    """A repeated prompt is served from the prefix cache in whole pages, short of its last token."""
    messages = [{"role": "user", "content": " ".join(f"w{i}" for i in range(60, 100))}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    page = served.engine.spec.page_size
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (second.usage.prompt_tokens - 1) // page * page > 0


def test_errors_surface_as_the_clients_exception_types(client):
    cases = [({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
             ({"seed": -5}, "seed"), ({"extra_body": {"top_k": "many"}}, "top_k")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", prompt=PROMPT, **{"max_tokens": 4, **kwargs})
        assert caught.value.status_code == 400 and caught.value.param == param, caught.value
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=100_000)
    assert caught.value.param == "max_completion_tokens" and caught.value.code == "context_length_exceeded"
    assert "max_completion_tokens (100000)" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ""}], max_tokens=-3)
    assert caught.value.param == "max_tokens"


def engine_accepts(keyword: str) -> bool:
    return keyword in inspect.signature(Engine.submit).parameters


@pytest.mark.parametrize("field, value", [("presence_penalty", 0.5), ("frequency_penalty", 0.5),
                                          ("logit_bias", {"78": -100})])  # 78: the first greedy token
def test_fields_the_engine_may_not_have(client, reference, field, value):
    """Each maps to the Engine keyword of its name: refused in one line until the engine has it, then passed."""
    if not engine_accepts(field):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, extra_body={field: value})
        assert caught.value.param == field and "not supported by this kiln yet" in caught.value.message
        neutral = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}[field]
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, extra_body={field: neutral})
        return
    expected = reference.generate(PROMPT, max_new_tokens=8, **{field: value})
    assert expected.text != reference.generate(PROMPT, max_new_tokens=8).text  # the field changes the output
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                           extra_body={field: value})
    assert completion.choices[0].text == expected.text
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                  extra_body={field: {"x": 1} if field == "logit_bias" else 5})
    assert caught.value.param == field


def test_response_format_maps_to_the_engine(client, reference):
    if not engine_accepts("response_format"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4,
                                           response_format={"type": "json_object"})
        assert caught.value.param == "response_format"
        return
    # the tiny word-level tokenizer has no byte decoder for llguidance, so only the mapping is checked here
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, response_format={"type": "xml"})
    assert caught.value.param == "response_format"
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                           response_format={"type": "text"})
    assert reply.choices[0].message.content == reference.chat(CHAT, max_new_tokens=6).text


def test_n_completions_of_one_prompt(client, reference):
    if not hasattr(Engine, "submit_n"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, n=2)
        assert caught.value.param == "n" and "not supported by this kiln yet" in caught.value.message
        return
    expected = reference.generate(PROMPT, n=3, max_new_tokens=8, temperature=0.9, seed=5)
    assert len({r.text for r in expected}) > 1  # seeds seed, seed + 1, ...: different samples
    completion = client.completions.create(model="tiny", prompt=PROMPT, n=3, max_tokens=8, temperature=0.9, seed=5)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert [c.text for c in completion.choices] == [r.text for r in expected]
    assert completion.usage.prompt_tokens == len(expected[0].prompt_token_ids)  # the prompt counts once
    assert completion.usage.completion_tokens == sum(len(r.token_ids) for r in expected)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, n=2, max_tokens=5, temperature=0.9,
                                                 seed=5, stream=True))
    texts = ["", ""]
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    expected = reference.generate(reference.chat_prompt(CHAT), n=2, max_new_tokens=5, temperature=0.9, seed=5)
    assert texts == [r.text for r in expected]


def log_softmax(row):
    row = np.asarray(row, np.float64)
    return row - row.max() - np.log(np.exp(row - row.max()).sum())


def test_logprobs(client, reference):
    if not engine_accepts("logprobs"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2)
        assert caught.value.param == "logprobs"
        return
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                           top_logprobs=3)
    expected = reference.chat(CHAT, max_new_tokens=5, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert [entry.token for entry in content] == [reference.tokenizer.decode([t]) for t in expected.token_ids]
    # independently: greedy log-probabilities are log-softmax of the model's logits at each position
    prompt = reference.chat_prompt(CHAT)
    rows = reference.logits(prompt + expected.token_ids[:-1])[len(prompt) - 1:]
    for entry, token_id, row in zip(content, expected.token_ids, rows):
        want = log_softmax(row)
        assert entry.logprob == pytest.approx(want[token_id], abs=1e-5)
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(np.sort(want)[::-1][:3], abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens).replace(" ", "") == completion.choices[0].text.replace(" ", "")
    assert len(logprobs.token_logprobs) == 4 and all(len(top) == 2 for top in logprobs.top_logprobs)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0,
                                                 logprobs=True, stream=True))
    streamed = [e.logprob for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.logprob for e in content]


def test_api_key(artifact):
    with kiln.load(artifact) as engine:
        server = ServerThread(create_app(engine, model_name="tiny", api_key="sesame"))
        try:
            with pytest.raises(openai.AuthenticationError):
                server.client("wrong").models.list()
            with pytest.raises(openai.AuthenticationError):
                server.client("wrong").completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
            assert server.client("sesame").completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices
            for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                                 ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings")):
                response = httpx.request(method, server.url + path, json={"prompt": PROMPT})
                assert assert_openai_error(response, 401, None)["code"] == "invalid_api_key"
            assert httpx.get(server.url + "/health").json() == {"status": "ok"}
            assert metrics(server.url, {"Authorization": "Bearer sesame"})[("kiln_kv_cache_pages",)] > 0
        finally:
            server.close()


# raw HTTP ---------------------------------------------------------------------------------------------------
def test_bad_json_and_wrong_types_name_the_field(served):
    url = served.url + "/v1/completions"
    assert assert_openai_error(httpx.post(url, content=b'{"prompt": "w7",'), 400, None)["code"] == "invalid_json"
    assert_openai_error(httpx.post(url, content=b"[1, 2]"), 400, None)
    assert_openai_error(httpx.post(url, content=b"\xff\xfe"), 400, None)
    assert_openai_error(httpx.post(url, content=b"[" * 100_000), 400, None)
    cases = [({"prompt": 5}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [1, "w"]}, "prompt"),
             ({"top_p": "x"}, "top_p"), ({"temperature": "hot"}, "temperature"), ({"max_tokens": True}, "max_tokens"),
             ({"max_tokens": 2.5}, "max_tokens"), ({"stop": 5}, "stop"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
             ({"stream": "yes"}, "stream"), ({"n": 0}, "n"), ({"stream_options": {"include_usage": True}},
                                                             "stream_options"),
             ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
             ({"echo": True}, "echo"), ({"prompt": [1, 2, 100_000]}, "prompt"), ({"prompt": ""}, "prompt")]
    for fields, param in cases:
        assert_openai_error(httpx.post(url, json={"prompt": PROMPT, "max_tokens": 2, **fields}), 400, param)
    chat = served.url + "/v1/chat/completions"
    for fields, param in [({"messages": "hi"}, "messages"), ({"messages": [{"content": "x"}]}, "messages[0]"),
                          ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                           "messages[0].content"), ({"tools": [{"type": "function"}]}, "tools")]:
        assert_openai_error(httpx.post(chat, json={"messages": CHAT, "max_tokens": 2, **fields}), 400, param)
    # an embedding request to a text model, an unknown route, a wrong method
    assert_openai_error(httpx.post(served.url + "/v1/embeddings", json={"input": "w7"}), 400, "model")
    assert_openai_error(httpx.get(served.url + "/v1/nothing"), 404, None)
    assert_openai_error(httpx.get(url), 405, None)


def test_unknown_fields_are_ignored(served, reference):
    response = httpx.post(served.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                                               "user": "me", "frobnicate": [1, {"x": None}]})
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == reference.generate(PROMPT, max_new_tokens=5).text


def test_limits_huge_max_tokens_long_prompts_big_bodies(served):
    url = served.url + "/v1/completions"
    error = assert_openai_error(httpx.post(url, json={"prompt": PROMPT, "max_tokens": 10**12}), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded" and str(MAX_SEQ_LEN) in error["message"]
    long_prompt = " ".join(["w9"] * (MAX_SEQ_LEN + 1))
    error = assert_openai_error(httpx.post(url, json={"prompt": long_prompt, "max_tokens": 1}), 400, "prompt")
    assert f"{MAX_SEQ_LEN + 1} tokens" in error["message"]
    long_chat = [{"role": "user", "content": long_prompt}]
    assert_openai_error(httpx.post(served.url + "/v1/chat/completions", json={"messages": long_chat}), 400,
                        "messages")
    huge = b'{"prompt": "' + b"w9 " * (3 * 2**20) + b'"}'  # 9 MiB, past the 8 MiB limit
    assert_openai_error(httpx.post(url, content=huge), 413, None)


def test_server_sent_events_end_with_done(served):
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]


def read_first_event(response):
    """Read up to the stream's first event; returns the iterator over the rest of its lines (a second
    iter_lines() would find the stream consumed, and dropping this one closes the connection)."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            return lines
    raise AssertionError("the stream ended before its first event")


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.01)


def test_a_client_leaving_mid_stream_cancels_its_request(served):
    before = metrics(served.url)
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client() as http:
        with http.stream("POST", served.url + "/v1/completions", json=body) as response:
            read_first_event(response)
    # the connection is closed; the engine drops the request and its pages
    cancelled = ("kiln_requests_total", ("finish_reason", "cancelled"))
    wait_until(lambda: metrics(served.url).get(cancelled, 0) == before.get(cancelled, 0) + 1, "the cancellation")
    after = metrics(served.url)
    generated = after[("kiln_generation_tokens_total",)] - before[("kiln_generation_tokens_total",)]
    assert 1 <= generated < LONG
    engine = served.engine
    wait_until(lambda: engine.pool.num_in_use() == 0 and not engine.scheduler.running, "freeing the pages")
    assert after[("kiln_requests_running",)] == after[("kiln_requests_waiting",)] == 0


def test_queue_limit_answers_503_with_retry_after(artifact, reference):
    """One request runs and none may wait: a second is refused while the first streams, and served after."""
    with kiln.load(artifact, max_running=1) as engine:
        server = ServerThread(create_app(engine, model_name="tiny", max_queued=0))
        try:
            body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "temperature": 0, "stream": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
                rest = read_first_event(response)
                refused = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                error = assert_openai_error(refused, 503, None)
                assert error["code"] == "server_overloaded" and refused.headers["retry-after"] == "1"
                with pytest.raises(openai.InternalServerError):
                    server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
                assert metrics(server.url)[("kiln_requests_running",)] == 1
                assert [line for line in rest if line][-1] == "data: [DONE]"
            wait_until(lambda: engine.pool.num_in_use() == 0, "the first request's end")
            completion = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
            assert completion.choices[0].text == reference.generate(PROMPT, max_new_tokens=4).text
            assert metrics(server.url)[("kiln_requests_rejected_total",)] == 2
        finally:
            server.close()


def test_metrics_count_what_the_requests_did(served, client):
    before = metrics(served.url)
    completion = client.completions.create(model="tiny", prompt="w90 w91 w92", max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    after = metrics(served.url)

    def delta(*key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta("kiln_prompt_tokens_total") == completion.usage.prompt_tokens
    assert delta("kiln_generation_tokens_total") == completion.usage.completion_tokens == 5
    assert delta("kiln_requests_total", ("finish_reason", "length")) == 1
    assert delta("kiln_time_to_first_token_seconds_count") == 1
    assert delta("kiln_inter_token_latency_seconds_count") == 4  # the tokens after the first
    assert delta("kiln_request_seconds_count") == 1
    engine = served.engine
    assert after[("kiln_kv_cache_pages",)] == engine.spec.num_pages
    assert after[("kiln_kv_cache_pages_in_use",)] == engine.pool.num_in_use() == 0
    queried, hit = after[("kiln_prefix_cache_queried_tokens_total",)], after[("kiln_prefix_cache_hit_tokens_total",)]
    assert delta("kiln_prefix_cache_queried_tokens_total") == completion.usage.prompt_tokens - 1
    assert after[("kiln_prefix_cache_hit_rate",)] == pytest.approx(hit / queried)


# embeddings -------------------------------------------------------------------------------------------------
def test_embeddings_equal_the_embedding_engine(tmp_path):
    pytest.importorskip("onnxruntime", reason="the tiny embedding model compiles for ONNX Runtime here")
    from test_embeddings import wordpiece_tokenizer, write_sentence_transformers

    source = write_sentence_transformers(tmp_path / "bert")
    path = kiln.compile(source, backend="onnxruntime", output=tmp_path / "bert.kiln").path
    texts = ["hello world", "the cat sat on the mat", "a"]
    with kiln.load(path) as engine:
        expected = engine.embed(texts)
        server = ServerThread(create_app(engine, model_name="bert"))
        try:
            result = server.client().embeddings.create(model="bert", input=texts)  # base64 on the wire
            assert [d.index for d in result.data] == [0, 1, 2]
            np.testing.assert_array_equal(np.array([d.embedding for d in result.data], np.float32), expected)
            tokens = sum(len(wordpiece_tokenizer().encode(t).ids) for t in texts)
            assert result.usage.prompt_tokens == result.usage.total_tokens == tokens
            response = httpx.post(server.url + "/v1/embeddings", json={"input": "a", "encoding_format": "float"})
            assert response.json()["data"][0]["embedding"] == expected[2].tolist()
            assert_openai_error(httpx.post(server.url + "/v1/embeddings", json={"input": [1, 2]}), 400, "input")
            assert_openai_error(httpx.post(server.url + "/v1/embeddings",
                                           json={"input": "a", "encoding_format": "hex"}), 400, "encoding_format")
            assert_openai_error(httpx.post(server.url + "/v1/completions", json={"prompt": "a"}), 400, "model")
            tokens += len(wordpiece_tokenizer().encode("a").ids)
            assert metrics(server.url)[("kiln_prompt_tokens_total",)] == tokens
        finally:
            server.close()


# the command line -------------------------------------------------------------------------------------------
def test_kiln_serve_then_ctrl_c_drains_and_exits(artifact, reference):
    """`kiln serve ARTIFACT --port 0`: answers like the engine; Ctrl-C lets a running stream finish, then the
    process ends with status 0 and one line."""
    process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", artifact, "--port", "0",
                                "--model-name", "tiny"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "KILN_API_KEY": ""})
    try:
        line = process.stderr.readline()
        while line and not line.startswith("kiln: serving"):  # notices from loading the engine come first
            line = process.stderr.readline()
        assert line.startswith("kiln: serving tiny on http://127.0.0.1:"), line
        url = line.split(" on ")[1].strip().removesuffix("/v1")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        expected = reference.generate(PROMPT, max_new_tokens=6)
        assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text \
            == expected.text
        long = reference.generate(PROMPT, max_new_tokens=300, ignore_eos=True)
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=300, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        pieces = [next(iter(stream)).choices[0].text]
        process.send_signal(signal.SIGINT)
        pieces += [c.choices[0].text for c in stream]
        assert "".join(pieces) == long.text  # drained, not cut
        assert process.wait(60) == 0
        errors = process.stderr.read()
        assert errors.strip() == "kiln: stopped serving" and "Traceback" not in errors
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_kiln_serve_refuses_a_busy_port_and_bad_flags(artifact):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in ((["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                              (["--port", "70000"], "--port must be in 0..65535"),
                              (["--max-queued", "-1"], "--max-queued must be 0 or more"),
                              (["--max-running", "0"], "--max-running must be 1 or more")):
            out = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", artifact, *args], capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 2 and "Traceback" not in out.stderr
            lines = [line for line in out.stderr.splitlines() if line.startswith("kiln: error")]
            assert len(lines) == 1 and message in lines[0], out.stderr
