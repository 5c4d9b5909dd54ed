"""`kiln serve --replicas N` on a local Ray instance the tests start: two replicas of a tiny model (one CPU each)
answer as Engine.generate / stream on the same artifact, requests spread over both, and a replica killed mid-test
is replaced by Ray while every request gets one answer: 200 with the engine's text, or a 5xx only for one that
was on the killed replica (no retry elsewhere, checked against each live replica's own request count)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import kiln
from kiln.cli import main

pytest.importorskip("fastapi", reason="kiln serve needs the serve extra (fastapi, uvicorn, prometheus_client)")
httpx = pytest.importorskip("httpx", reason="the tests talk HTTP through httpx")

from tiny_models import save_tiny_checkpoint  # noqa: E402

MAX_SEQ_LEN = 1024
PROMPT = "w7 w8 w9 w10"
SHORT = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
LONG_TOKENS = 600  # ~1 s on the reference backend: still running when the test acts
REPLICA_HEADER = "x-kiln-replica"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def needs_ray():
    return pytest.importorskip("ray.serve", reason="the replica tests need Ray Serve: pip install 'kiln[ray]'")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_tiny_checkpoint(directory)
    return kiln.compile(str(directory), backend="reference", max_seq_len=MAX_SEQ_LEN,
                        output=tmp_path_factory.mktemp("art") / "tiny.kiln").path


@pytest.fixture(scope="module")
def reference(artifact):
    """An engine of its own on the artifact: what the replicas answer must be what it generates."""
    with kiln.load(artifact) as engine:
        yield engine


@pytest.fixture(scope="module")
def cluster(artifact):
    """Two replicas on a Ray instance of this process (2 CPUs: one per replica); Ray is shut down after."""
    needs_ray()
    import ray
    from ray import serve

    from kiln.replicas import deploy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield deploy(artifact, replicas=2, model_name="tiny", port=free_port())
    finally:
        serve.shutdown()
        ray.shutdown()


# the command line --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "--replicas must be 1 or more"),
    (["--ray-address", "auto"], "give --replicas N too"),
    (["--replicas", "2", "--port", "0"], "--replicas needs a fixed --port"),
])
def test_kiln_serve_refuses_bad_replica_flags(artifact, capsys, args, message):
    assert main(["serve", artifact, *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: ") and message in lines[0], lines


def test_kiln_serve_replicas_needs_an_artifact(tmp_path, capsys):
    checkpoint = tmp_path / "tiny-llama"
    save_tiny_checkpoint(checkpoint)
    assert main(["serve", str(checkpoint), "--replicas", "2"]) == 2
    assert "--replicas serves a compiled artifact" in capsys.readouterr().err


@pytest.mark.slow
def test_kiln_serve_replicas_then_ctrl_c_drains_and_exits(artifact, reference):
    """`kiln serve ARTIFACT --replicas 2`: answers like the engine; Ctrl-C lets a running stream finish, removes
    the deployment and stops the Ray instance it started, ending with status 0 and one line."""
    needs_ray()
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", artifact, "--replicas", "2", "--port",
                                str(port), "--model-name", "tiny"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "KILN_API_KEY": ""})
    try:
        line = process.stderr.readline()
        while line and not line.startswith("kiln: serving"):  # Ray's notices come first
            line = process.stderr.readline()
        assert line.strip() == f"kiln: serving tiny on http://127.0.0.1:{port}/v1 (2 replicas on Ray Serve)", line
        url = f"http://127.0.0.1:{port}"
        expected = reference.generate(PROMPT, max_new_tokens=8, temperature=0.0)
        assert httpx.post(url + "/v1/completions", json=SHORT).json()["choices"][0]["text"] == expected.text
        long = reference.generate(PROMPT, max_new_tokens=300, ignore_eos=True, temperature=0.0)
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}) as stream:
            lines = stream.iter_lines()
            events = [next(lines)]
            process.send_signal(signal.SIGINT)
            events += list(lines)
        assert streamed_text(events) == long.text and events[-2:] == ["data: [DONE]", ""]  # drained, not cut
        assert process.wait(60) == 0
        assert process.stderr.read().strip() == "kiln: stopped serving"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def streamed_text(lines: list) -> str:
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


# two replicas ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_both_replicas_answer_as_the_engine_and_share_the_requests(cluster, reference):
    expected = reference.generate(PROMPT, max_new_tokens=8, temperature=0.0).text
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: httpx.post(cluster + "/v1/completions", json=SHORT, timeout=60),
                                  range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    assert {r.json()["choices"][0]["text"] for r in responses} == {expected}
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2  # both replicas served
    chat = [{"role": "user", "content": "w7 w8"}]
    answer = httpx.post(cluster + "/v1/chat/completions", timeout=60,
                        json={"messages": chat, "max_tokens": 12, "temperature": 0}).json()
    assert answer["choices"][0]["message"]["content"] == reference.chat(chat, max_new_tokens=12,
                                                                        temperature=0.0).text


@pytest.mark.slow
def test_streams_come_through_the_proxy_as_they_are_generated(cluster, reference):
    pieces = list(reference.stream(PROMPT, max_new_tokens=LONG_TOKENS, ignore_eos=True, temperature=0.0))
    started = time.monotonic()
    arrivals, lines = [], []
    with httpx.stream("POST", cluster + "/v1/completions", timeout=60, json={
            "prompt": PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}) as stream:
        for line in stream.iter_lines():
            arrivals.append(time.monotonic() - started)
            lines.append(line)
    assert streamed_text(lines) == "".join(pieces) and lines[-2:] == ["data: [DONE]", ""]
    # buffered, every chunk would come at the end; streamed, the first comes long before the last
    assert arrivals[0] < arrivals[-1] / 2, (arrivals[0], arrivals[-1])


@pytest.mark.slow
def test_a_killed_replica_is_restarted_and_no_request_is_lost_or_answered_twice(cluster, reference):
    """Clients keep sending while one replica is killed (ray.kill on its actor): Ray starts a replacement; each
    request gets exactly one answer, and only requests sent before the kill took effect may fail (a unary one
    with 500, a stream cut before [DONE] after its 200); none is run again on another replica."""
    import ray
    from ray import serve

    expected = reference.generate(PROMPT, max_new_tokens=8, temperature=0.0).text
    long_text = reference.generate(PROMPT, max_new_tokens=LONG_TOKENS, ignore_eos=True, temperature=0.0).text
    long_body = {"prompt": PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0, "ignore_eos": True}
    run_before = requests_run_by_each_replica(cluster, set(replica_actor_names()))
    outcomes = []  # (sent, status, replica, text, expected text) of each unary request
    stop = threading.Event()

    def post(body, expected_text):
        sent = time.monotonic()
        try:
            response = httpx.post(cluster + "/v1/completions", json=body, timeout=120)
        except httpx.HTTPError as err:  # no answer at all: recorded, so that the checks below fail on it
            outcomes.append((sent, None, None, repr(err), expected_text))
            return
        text = response.json()["choices"][0]["text"] if response.status_code == 200 else None
        outcomes.append((sent, response.status_code, response.headers.get(REPLICA_HEADER), text, expected_text))

    def keep_sending():
        while not stop.is_set():
            post(SHORT, expected)

    stream_replica, stream_lines, stream_error = [], [], []

    def stream_long(first_line: threading.Event):
        try:
            with httpx.stream("POST", cluster + "/v1/completions", json={**long_body, "stream": True},
                              timeout=120) as stream:
                assert stream.status_code == 200
                stream_replica.append(stream.headers[REPLICA_HEADER])
                for line in stream.iter_lines():
                    stream_lines.append(line)
                    first_line.set()
        except httpx.RemoteProtocolError as err:  # the replica died mid-body
            stream_error.append(err)
        finally:
            first_line.set()

    first_line = threading.Event()
    workers = [threading.Thread(target=stream_long, args=(first_line,))]
    workers += [threading.Thread(target=post, args=(long_body, long_text)) for _ in range(2)]
    workers += [threading.Thread(target=keep_sending) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        assert first_line.wait(60) and stream_lines
        victim = stream_replica[0]  # the replica streaming the long answer
        actor_name = replica_actor_names()[victim]
        ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 60
        while victim in replica_actor_names():
            assert time.monotonic() < deadline, "the killed replica's actor is still alive"
            time.sleep(0.05)
        dead_at = time.monotonic()
        while not (len(replica_actor_names()) == 2 and running_replicas(serve) == 2):
            assert time.monotonic() < deadline, f"Ray did not replace the killed replica: {serve.status()}"
            time.sleep(0.2)
        live = set(replica_actor_names())
        while not live <= {o[2] for o in outcomes if o[0] > dead_at}:  # the new replica serves too
            assert time.monotonic() < deadline, "a live replica answered nothing after the kill"
            time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join(180)
    # the stream on the killed replica was cut, and what it sent is the engine's text, nothing repeated
    assert stream_error and "data: [DONE]" not in stream_lines
    assert long_text.startswith(streamed_text(stream_lines))
    for sent, status, replica, text, expected_text in outcomes:
        if status == 200:
            assert text == expected_text
        else:  # in flight on the killed replica
            assert status == 500 and sent < dead_at, (status, text, sent - dead_at)
    # each live replica ran exactly the requests it answered: none was retried elsewhere after failing
    run_after = requests_run_by_each_replica(cluster, live)
    assert {r: run_after[r] - run_before.get(r, 0) for r in live} == \
        {r: sum(1 for o in outcomes if o[1] == 200 and o[2] == r) for r in live}


def replica_actor_names() -> dict:
    """{replica id: Ray actor name} of the kiln application's live replicas (Serve names each actor with the id
    the x-kiln-replica header carries)."""
    import ray

    return {actor["name"].rsplit("#", 1)[1]: actor["name"]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == "serve" and actor["name"].startswith("SERVE_REPLICA::kiln#kiln#")}


def running_replicas(serve) -> int:
    return serve.status().applications["kiln"].deployments["kiln"].replica_states.get("RUNNING", 0)


def requests_run_by_each_replica(url: str, replicas: set) -> dict:
    """kiln_requests_total of each replica, from /metrics asked until each replica has answered it once."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for _ in range(200):
        response = httpx.get(url + "/metrics")
        counts[response.headers[REPLICA_HEADER]] = sum(
            sample.value for family in text_string_to_metric_families(response.text) for sample in family.samples
            if sample.name == "kiln_requests_total")
        if set(counts) == replicas:
            return counts
    raise AssertionError(f"/metrics reached only replicas {sorted(counts)} of {sorted(replicas)}")


def test_replicas_load_with_the_serve_flags_engine_options(artifact, tmp_path, monkeypatch):
    """--max-running and speculation reach every replica's Engine; a draft's path is made absolute, since each
    replica (maybe on another node) opens it by path."""
    from kiln.cli import build_parser, replica_engine_options

    monkeypatch.chdir(os.path.dirname(artifact))
    args = build_parser().parse_args(["serve", artifact, "--replicas", "2", "--max-running", "4", "--draft",
                                      os.path.basename(artifact), "--num-speculative-tokens", "3"])
    assert replica_engine_options(args) == {"draft": artifact, "num_speculative_tokens": 3, "max_running": 4}
