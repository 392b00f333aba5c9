"""HTTP for a pipeline, through Ray Serve: `app(node)` is a Serve application.

    from ray import serve
    from pipeline_ir.serve import app

    serve.run(app(node, max_in_flight=64, timeout=5.0), route_prefix="/classify")

Each replica of the ingress deployment deploys its own copy of the pipeline
in its constructor and shuts it down in `__del__`, which Serve calls when it
stops the replica (and which ends the pipeline's actors). A request is one
`call_async`:

    POST, Content-Type: application/json   the decoded JSON value is the input
    POST, any other content type           the raw body, as `bytes`
    200                                    the result as JSON (numpy arrays and
                                           torch tensors as nested lists)

Errors are JSON `{"error": message, "step": step name or null}`, never a
traceback:

    400  malformed JSON, or a Content-Length that is not a number
    405  a method other than POST (with `Allow: POST`)
    413  a body over `max_body_bytes`
    422  a step raised ValueError, TypeError or KeyError (bad input)
    500  a step raised anything else; or an unexpected error (logged in the
         replica, answered with a generic message)
    503  PipelineOverloadedError: over `max_in_flight` (with `Retry-After`)
    504  the per-request `timeout` expired

This module needs Ray Serve (the `serve` extra) and is the only one that
imports it; `import pipeline_ir` never imports it. It decides nothing about
the pipeline: it compiles, deploys and calls it like any other caller.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Unpack

import msgspec
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from pipeline_ir.builder import PipelineNode
from pipeline_ir.compile import CompiledPipeline, compile
from pipeline_ir.errors import PipelineOverloadedError, StepError
from pipeline_ir.options import DeployKwargs, DeployOptions, check_timeout
from pipeline_ir.pipeline import Pipeline

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_ONGOING_REQUESTS", "PipelineIngress", "app"]

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
# Serve's own default (5) suits replicas that compute. This one only awaits
# the pipeline, and the pipeline's `max_in_flight` is the admission limit
# that answers 503: Serve must let more requests through than that, or they
# would queue in Serve's router and never be refused.
DEFAULT_MAX_ONGOING_REQUESTS = 256
# A step raising one of these was handed input it cannot take: the client's fault.
_BAD_INPUT = (ValueError, TypeError, KeyError)

logger = logging.getLogger("ray.serve")  # Serve writes it to the replica's log


@dataclass(frozen=True)
class _Settings:
    """What each ingress replica needs besides the pipeline."""

    max_body_bytes: int
    timeout: float | None
    retry_after_s: int
    deploy_options: DeployKwargs


class _HTTPError(Exception):
    """A request answered with an error status before the pipeline ran."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PipelineIngress:
    """The ingress deployment's replica: one deployed pipeline, called once
    per request. Built by `app()`; not meant to be constructed by hand."""

    def __init__(self, compiled: CompiledPipeline, settings: _Settings) -> None:
        self._settings = settings
        self._pipeline: Pipeline = compiled.deploy(**settings.deploy_options)

    async def __call__(self, request: Request) -> Response:
        if request.method != "POST":
            return _error(405, f"use POST, not {request.method}", headers={"Allow": "POST"})
        try:
            x = await _read_input(request, self._settings.max_body_bytes)
            result = await self._pipeline.call_async(x, timeout=self._settings.timeout)
            body = _encode(result)
        except Exception as e:
            return _error_response(e, self._settings.retry_after_s)
        return Response(body, media_type="application/json")

    def __del__(self) -> None:
        # Serve calls this when it stops the replica, and the garbage
        # collector may call it again: the first call takes the pipeline.
        # The constructor may have failed before the pipeline existed.
        pipeline: Pipeline | None = self.__dict__.pop("_pipeline", None)
        if pipeline is not None:
            pipeline.shutdown()
            logger.info("pipeline_ir.serve: pipeline %r shut down with its replica", pipeline.graph.name)


_Ingress: Any = serve.deployment(PipelineIngress)


def app(
    node_or_compiled: PipelineNode | tuple[PipelineNode, ...] | list[PipelineNode] | CompiledPipeline,
    *,
    name: str | None = None,
    num_replicas: int = 1,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    timeout: float | None = None,
    max_ongoing_requests: int | None = None,
    ray_actor_options: Mapping[str, object] | None = None,
    **deploy_options: Unpack[DeployKwargs],
) -> serve.Application:
    """A Ray Serve application that answers HTTP POSTs with the pipeline.

    node_or_compiled: the pipeline's output node(s), compiled here, or a
        CompiledPipeline (compile errors are raised now, in this process).
    name: the ingress deployment's name (default: the pipeline's name).
    num_replicas: ingress replicas; each deploys its own pipeline, so
        `max_in_flight` and the actors' replicas count per ingress replica.
    max_body_bytes: larger request bodies are answered 413.
    timeout: seconds each request may run (`call_async(x, timeout=)`);
        past it, 504 naming the step still running. None: no deadline.
    max_ongoing_requests: requests Serve sends one ingress replica at once
        (default: DEFAULT_MAX_ONGOING_REQUESTS, or twice `max_in_flight`
        when that is larger).
    ray_actor_options: Serve's options for the ingress replicas' actors
        (default: Serve's, 1 CPU).
    deploy_options: as for `deploy()` (`max_in_flight`,
        `overload_timeout_s`, ...), checked here, applied by each replica.

    Run it with `serve.run(app(...), route_prefix="/name")`.
    """
    compiled = node_or_compiled if isinstance(node_or_compiled, CompiledPipeline) else compile(node_or_compiled)
    _check_positive_int("num_replicas", num_replicas)
    _check_positive_int("max_body_bytes", max_body_bytes)
    seconds = check_timeout("app()", timeout)
    # Wrong deploy options fail here, not in replicas that Serve restarts.
    known = [f.name for f in dataclasses.fields(DeployOptions)]
    unknown = sorted(set(deploy_options) - set(known))
    if unknown:
        raise TypeError(
            f"app(): unknown option(s) {', '.join(unknown)}; besides its own keywords, app() takes "
            f"the options of deploy(): {', '.join(known)}"
        )
    checked = DeployOptions(**deploy_options)
    if max_ongoing_requests is None:
        max_ongoing_requests = max(DEFAULT_MAX_ONGOING_REQUESTS, 2 * (checked.max_in_flight or 0))
    _check_positive_int("max_ongoing_requests", max_ongoing_requests)

    # Serve pickles the pipeline now; steps from modules its workers cannot
    # import (tests, __main__) must travel by value, as deploy() ensures.
    from pipeline_ir.backends.ray_runtime import ship_code

    ship_code(binding.target for binding in compiled.bindings.steps.values())
    settings = _Settings(
        max_body_bytes=max_body_bytes,
        timeout=seconds,
        # The pipeline already waited overload_timeout_s for a free slot.
        retry_after_s=max(1, math.ceil(checked.overload_timeout_s)),
        deploy_options=deploy_options,
    )
    options: dict[str, object] = {
        "name": name or compiled.graph.name,
        "num_replicas": num_replicas,
        "max_ongoing_requests": max_ongoing_requests,
    }
    if ray_actor_options is not None:
        options["ray_actor_options"] = dict(ray_actor_options)
    application: serve.Application = _Ingress.options(**options).bind(compiled, settings)
    return application


def _check_positive_int(argument: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"app(): {argument} must be an int >= 1, got {value!r}")


async def _read_input(request: Request, max_body_bytes: int) -> object:
    """The pipeline's input: decoded JSON, or the raw body as bytes."""
    body = await _read_body(request, max_body_bytes)
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        return body
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise _HTTPError(400, f"malformed JSON body: {e}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit`:
    from Content-Length before reading, else while reading (chunked)."""
    too_large = f"the request body is over max_body_bytes ({limit} bytes); send a smaller one"
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise _HTTPError(400, f"Content-Length {length!r} is not a number") from None
        if declared > limit:
            raise _HTTPError(413, too_large)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _HTTPError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def _to_builtin(value: Any) -> object:
    """msgspec's enc_hook: numpy arrays and scalars, torch tensors as
    nested lists and numbers. A value can only be one of those if its
    library is imported already, so neither is imported here."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    raise TypeError(f"a {type(value).__module__}.{type(value).__qualname__} has no JSON form")


_encoder = msgspec.json.Encoder(enc_hook=_to_builtin)


def _encode(result: object) -> bytes:
    try:
        return _encoder.encode(result)
    except (TypeError, msgspec.EncodeError) as e:
        raise _HTTPError(500, f"the pipeline's result cannot be answered as JSON: {e}") from None


def _error(status: int, message: str, step: str | None = None, headers: Mapping[str, str] | None = None) -> Response:
    body = msgspec.json.encode({"error": message, "step": step})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error_response(exc: Exception, retry_after_s: int) -> Response:
    """The answer for an exception raised while serving a request."""
    if isinstance(exc, _HTTPError):
        return _error(exc.status, exc.message)
    if isinstance(exc, PipelineOverloadedError):
        return _error(503, str(exc), headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, TimeoutError):
        # PipelineTimeoutError names the step still running.
        return _error(504, str(exc) or "the request's timeout expired", getattr(exc, "step_name", None))
    if isinstance(exc, StepError):
        status = 422 if isinstance(exc.__cause__, _BAD_INPUT) else 500
        return _error(status, str(exc), exc.step_name)
    logger.error("pipeline_ir.serve: unexpected error while serving a request", exc_info=exc)
    return _error(500, "internal error while serving this request; the Serve replica's log has the details")
