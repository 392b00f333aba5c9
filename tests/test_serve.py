"""pipeline_ir.serve: pipelines over HTTP through Ray Serve, as a client sees them.

One Serve instance for the module (starting it costs seconds), on a free
port of 127.0.0.1, with three applications:

    /main      a LOCAL step, then an ACTORS step with two replicas: JSON in
               and out, bytes in, numpy out, every error a step can cause
    /gate      max_in_flight=1: a second request while one waits is 503
    /deadline  timeout=0.5: a step that does not finish in time is 504

Requests go through a real HTTP client (http.client). Steps that must stay
in flight wait for a file the test creates, so nothing depends on timing.
The last test shuts Serve down and checks that the pipelines' actors end.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

serve = pytest.importorskip("ray.serve")

import pipeline_ir as pipeline  # noqa: E402
from pipeline_ir.serve import _error_response, _to_builtin, app  # noqa: E402
from process_helpers import wait_gone  # noqa: E402

LIMIT = 1024  # max_body_bytes of /main


@pipeline.step
def validate(x: object) -> object:
    if x == "invalid":
        raise ValueError("'invalid' is not an input this pipeline takes")
    return x


@pipeline.step(execution_mode="actors", num_replicas=2)
class Answer:
    def __call__(self, x: Any) -> object:
        import numpy as np

        pid = os.getpid()
        if isinstance(x, bytes):
            return {"bytes": len(x), "head": x[:4].decode("latin-1"), "pid": pid}
        if not isinstance(x, dict):
            return {"echo": x, "pid": pid}
        op = x["op"]  # a dict without "op": KeyError, the client's fault
        if op == "echo":
            return {"echo": x.get("value"), "pid": pid}
        if op == "arange":
            return {"array": np.arange(x["n"], dtype=np.int64).reshape(2, -1), "scalar": np.float32(1.5), "pid": pid}
        if op == "type":
            raise TypeError("op 'type' wants a number")
        if op == "object":
            return object()
        raise RuntimeError(f"op {op!r} exploded")


@pipeline.step(execution_mode="tasks")
def hold(directory: str) -> str:
    """Signal that this call runs, then wait for the test to release it."""
    d = Path(directory)
    (d / f"started-{os.getpid()}").touch()
    deadline = time.monotonic() + 60  # never outlive a failed test by much
    while not (d / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"


@dataclass
class Server:
    port: int
    pids: set[int] = field(default_factory=set)

    def request(
        self,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        content_type: str | None = "application/json",
        method: str = "POST",
    ) -> tuple[int, http.client.HTTPMessage, Any]:
        """Status, headers and decoded JSON body of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            headers = {} if content_type is None else {"Content-Type": content_type}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        assert response.getheader("Content-Type", "").startswith("application/json"), data
        return response.status, response.headers, json.loads(data)

    def post_json(self, path: str, value: object) -> tuple[int, Any]:
        status, _, body = self.request(path, json.dumps(value).encode())
        if status == 200 and isinstance(body, dict) and "pid" in body:
            self.pids.add(body["pid"])
        return status, body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(ray_session: Any) -> Iterator[Server]:
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app(Answer()(validate(pipeline.INPUT)), max_body_bytes=LIMIT), name="main", route_prefix="/main")
        gate = app(hold(pipeline.INPUT), name="gate", max_in_flight=1, overload_timeout_s=0.1)
        serve.run(gate, name="gate", route_prefix="/gate")
        serve.run(app(hold(pipeline.INPUT), name="deadline", timeout=0.5), name="deadline", route_prefix="/deadline")
        yield Server(port)
    finally:
        serve.shutdown()


def _started(directory: Path) -> bool:
    return any(directory.glob("started-*"))


def _wait_started(directory: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _started(directory):
        assert time.monotonic() < deadline, "the held call never started"
        time.sleep(0.01)


# --- answers --------------------------------------------------------------


def test_json_in_json_out(server: Server) -> None:
    assert server.post_json("/main", {"op": "echo", "value": [1, "two", {"3": None}]})[1]["echo"] == [1, "two", {"3": None}]
    status, body = server.post_json("/main", 41)
    assert status == 200 and body["echo"] == 41


def test_other_content_types_get_the_raw_bytes(server: Server) -> None:
    png_like = b"\x89PNG" + bytes(range(200))
    status, _, body = server.request("/main", png_like, content_type="image/png")
    assert status == 200 and body["bytes"] == len(png_like) and body["head"] == "\x89PNG"
    # No Content-Type at all: bytes too. A JSON media type with parameters is JSON.
    assert server.request("/main", b"[1]", content_type=None)[2]["bytes"] == 3
    assert server.request("/main", b"[1]", content_type="Application/JSON; charset=utf-8")[2]["echo"] == [1]


def test_numpy_results_are_nested_lists(server: Server) -> None:
    status, body = server.post_json("/main", {"op": "arange", "n": 6})
    assert status == 200
    assert body["array"] == [[0, 1, 2], [3, 4, 5]]
    assert body["scalar"] == 1.5


def test_torch_tensors_become_nested_lists() -> None:
    torch = pytest.importorskip("torch")
    assert _to_builtin(torch.arange(4).reshape(2, 2)) == [[0, 1], [2, 3]]
    with pytest.raises(TypeError, match="builtins.object has no JSON form"):
        _to_builtin(object())


def test_concurrent_requests_all_answered_correctly(server: Server) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: server.post_json("/main", {"op": "echo", "value": i}), range(32)))
    assert [status for status, _ in answers] == [200] * 32
    assert [body["echo"] for _, body in answers] == list(range(32))
    assert len({body["pid"] for _, body in answers}) >= 1


# --- errors ---------------------------------------------------------------


def test_malformed_json_is_400(server: Server) -> None:
    status, _, body = server.request("/main", b'{"op": ')
    assert status == 400
    assert body["error"].startswith("malformed JSON body") and body["step"] is None


def test_other_methods_are_405(server: Server) -> None:
    status, headers, body = server.request("/main", method="GET", content_type=None)
    assert status == 405 and headers["Allow"] == "POST"
    assert body == {"error": "use POST, not GET", "step": None}


def test_body_over_the_limit_is_413(server: Server) -> None:
    # Content-Length over the limit: refused before the body is read.
    status, _, body = server.request("/main", b"x" * (LIMIT + 1), content_type="image/png")
    assert status == 413 and "max_body_bytes (1024 bytes)" in body["error"] and body["step"] is None
    # Chunked, no Content-Length: refused while reading.
    status, _, body = server.request("/main", iter([b"x" * 600, b"x" * 600]), content_type="image/png")
    assert status == 413 and "max_body_bytes" in body["error"]
    # At the limit exactly: accepted.
    assert server.request("/main", b"x" * LIMIT, content_type="image/png")[2]["bytes"] == LIMIT


@pytest.mark.parametrize(
    ("value", "step", "cause"),
    [
        ("invalid", "validate", "ValueError"),  # raised by the LOCAL step, in the ingress replica
        ({"op": "type"}, "Answer", "TypeError"),
        ({"no": "op"}, "Answer", "KeyError"),
    ],
)
def test_bad_input_is_422_naming_the_step(server: Server, value: object, step: str, cause: str) -> None:
    status, body = server.post_json("/main", value)
    assert status == 422
    assert body["step"] == step and f"raised {cause}" in body["error"]
    assert "Traceback" not in body["error"]


def test_other_step_errors_are_500_naming_the_step(server: Server) -> None:
    status, body = server.post_json("/main", {"op": "explode"})
    assert status == 500
    assert body["step"] == "Answer" and "RuntimeError: op 'explode' exploded" in body["error"]
    assert "Traceback" not in body["error"]


def test_a_result_without_json_form_is_500(server: Server) -> None:
    status, body = server.post_json("/main", {"op": "object"})
    assert status == 500 and "cannot be answered as JSON" in body["error"] and body["step"] is None


def test_unexpected_errors_are_500_with_a_generic_message_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        response = _error_response(RuntimeError("secret internals"), retry_after_s=1)
    assert response.status_code == 500
    body = json.loads(bytes(response.body))
    assert body["step"] is None and "secret" not in body["error"] and "log" in body["error"]
    assert "secret internals" in caplog.text


def test_overload_is_503_with_retry_after(server: Server, tmp_path: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(server.post_json, "/gate", str(tmp_path))
        try:
            _wait_started(tmp_path)
            status, headers, body = server.request("/gate", json.dumps(str(tmp_path)).encode())
            assert status == 503, body
            assert int(headers["Retry-After"]) >= 1 and body["step"] is None and body["error"]
        finally:
            (tmp_path / "release").touch()
        assert first.result() == (200, "released")


def test_deadline_is_504_naming_the_step(server: Server, tmp_path: Path) -> None:
    try:
        status, body = server.post_json("/deadline", str(tmp_path))
    finally:
        (tmp_path / "release").touch()
    assert status == 504, body
    assert body["step"] == "hold" and body["error"]


# --- building -------------------------------------------------------------


def test_app_checks_its_arguments_before_anything_runs() -> None:
    node = validate(pipeline.INPUT)
    with pytest.raises(ValueError, match="max_body_bytes must be an int >= 1"):
        app(node, max_body_bytes=0)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        app(node, timeout=0)
    with pytest.raises(TypeError, match="unknown option.s. max_inflight; .* deploy..: max_in_flight, "):
        app(node, max_inflight=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="max_in_flight must be an int >= 1"):
        app(node, max_in_flight=0)


# --- shutdown (keep last: it ends the module's Serve instance) -------------


def test_shutdown_ends_every_pipeline_actor(server: Server) -> None:
    for i in range(8):  # reach both replicas of Answer, most likely
        server.post_json("/main", {"op": "echo", "value": i})
    assert server.pids and os.getpid() not in server.pids
    serve.shutdown()
    assert wait_gone(server.pids, timeout_s=60) == []

