"""`kiln serve --replicas N`: N engines as one Ray Serve deployment behind kiln's own OpenAI routes. Each replica
is a Ray actor that loads the compiled artifact and runs kiln/server.py's FastAPI app; Ray's HTTP proxy spreads
requests over the replicas and Ray's controller replaces a replica that dies."""

from __future__ import annotations

import os

from ray import serve
from ray.serve.config import BackpressureConfig

from kiln.api import load
from kiln.backends.tvm.executor import RUNTIME_ONLY_ENV
from kiln.ir.errors import ArtifactError
from kiln.runtime.artifact import is_artifact
from kiln.runtime.engine import DEFAULT_MAX_RUNNING
from kiln.server import DEFAULT_MAX_QUEUED, RETRY_AFTER_SECONDS, create_app

APP_NAME = "kiln"
REPLICA_HEADER = "x-kiln-replica"


class ReplicaHeader:
    """ASGI middleware that names the answering replica in a response header: /metrics describes only the
    replica that serves it, and the name tells which one that was."""

    def __init__(self, app, replica: str):
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_name(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER.encode(),
                                                                                self.replica)]}
            await send(message)

        return await self.app(scope, receive, send_with_name)


@serve.deployment(name="kiln")
@serve.ingress()
class KilnReplica:
    """One Engine on one Ray actor, serving create_app's routes (built after the engine loads)."""

    def __init__(self, artifact: str, *, model_name: str, api_key: str | None, max_queued: int,
                 threads: int | None, engine_options: dict):
        if not is_artifact(artifact):
            raise ArtifactError(f"no kiln artifact at {artifact} on this Ray node; every node must see the "
                                f"artifact directory at the same path (a shared file system, or a copy made "
                                f"there before serving)")
        os.environ.setdefault(RUNTIME_ONLY_ENV, "1")  # a replica only runs the artifact: no TVM compiler
        self.engine = load(artifact, **engine_options, **({"num_threads": threads} if threads else {}))
        self.settings = {"model_name": model_name, "api_key": api_key, "max_queued": max_queued}

    def __serve_build_asgi_app__(self):
        app = create_app(self.engine, **self.settings)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    def __del__(self):
        self.engine.close()


def deploy(artifact: str, *, replicas: int, model_name: str, host: str = "127.0.0.1", port: int = 8000,
           api_key: str | None = None, max_queued: int = DEFAULT_MAX_QUEUED, drain_timeout: float = 30.0,
           threads: int | None = None, engine_options: dict | None = None) -> str:
    """Run ``replicas`` engines of ``artifact`` as the Ray Serve application "kiln" on the cluster this process
    has joined (ray.init first) and return its base URL once every replica is up. A replica takes as many HTTP
    requests as one kiln server admits (its batch and ``max_queued``; its own 503 past that); when every replica
    is full, each Ray proxy holds ``max_queued`` more and answers 503 with Retry-After beyond them.
    ``engine_options``: Engine keywords every replica loads with (max_running, speculation; a draft artifact's path,
    like the artifact's, must be the same on every node)."""
    engine_options = dict(engine_options or {})
    serve.start(http_options={"host": host, "port": port})
    deployment = KilnReplica.options(
        num_replicas=replicas,
        max_ongoing_requests=engine_options.get("max_running", DEFAULT_MAX_RUNNING) + max_queued,
        # Ray counts a request as queued while it is being routed, so 0 would refuse every request
        max_queued_requests=max(max_queued, 1),
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_SECONDS),
        graceful_shutdown_timeout_s=drain_timeout,
        ray_actor_options={"num_cpus": threads or 1})
    serve.run(deployment.bind(os.path.abspath(artifact), model_name=model_name, api_key=api_key,
                              max_queued=max_queued, threads=threads, engine_options=engine_options),
              name=APP_NAME, route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def undeploy() -> None:
    """Remove the kiln application: its replicas finish running requests (up to the drain timeout) first."""
    serve.delete(APP_NAME)
