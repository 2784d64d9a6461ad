"""The cloud executor: one chat completion on an OpenAI-compatible endpoint (vLLM, Ollama,
llama.cpp's server, a hosted API). The only module that imports httpx for inference.

It owns the HTTP client, the request body (the same messages the local model gets, and the
route's JSON schema as `response_format`) and the translation of every httpx failure into a
`CloudError` whose `reason` is short enough to go into a result's `executor_reason`. It does not
decide whether to call the cloud (agent/flows/offload.py and agent/flows/executors.py do) and never
sees readings of a `local` route. The API key goes only into the Authorization header: never into a
log event, an error message or the URL.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from agent.base.errors import TransientError, Unavailable
from agent.base.records import Completion, Generation, ModelInfo
from agent.config.settings import CloudModelSection


class CloudError(TransientError):
    """The cloud model gave no usable answer; `reason` names why in a few words. Counts as an
    attempt on the reading: the request itself may be the cause (HTTP 4xx, a malformed answer)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class CloudUnavailable(CloudError, Unavailable):
    """The cloud cannot be asked now: unreachable, timed out, a server error, or the circuit is
    open. Not the reading's fault: a cloud-only reading waits in the inbox for the cloud."""


@dataclass(frozen=True, slots=True)
class CloudAnswer:
    completion: Completion
    model: ModelInfo


class CloudModel:
    """An HTTP client for one OpenAI-compatible endpoint. Close it with `aclose()`."""

    def __init__(
        self, section: CloudModelSection, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        if section.base_url is None:
            raise ValueError("cloud_model.base_url is not set")
        self._section = section
        headers = {"Accept": "application/json"}
        if section.api_key is not None:
            headers["Authorization"] = f"Bearer {section.api_key.get_secret_value()}"
        self._base_url = section.base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(section.timeout_s), transport=transport,
            follow_redirects=False,
        )
        self.requests = 0

    @property
    def base_url(self) -> str:
        return self._base_url

    def _body(self, messages: list[dict[str, str]], generation: Generation) -> dict[str, Any]:
        schema = generation.schema
        body: dict[str, Any] = {"model": self._section.model, "messages": messages,
                                "max_tokens": generation.max_tokens,
                                "temperature": generation.temperature,
                                "seed": generation.seed, "stream": False}
        if schema is not None:
            if self._section.response_format == "json_object":
                # llama-cpp-python's server: {"type": "json_object", "schema": ...}; it refuses
                # the "json_schema" type with a validation error.
                body["response_format"] = {"type": "json_object", "schema": schema}
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": schema, "strict": True},
                }
        return body

    async def complete(self, messages: list[dict[str, str]], generation: Generation
                       ) -> CloudAnswer:
        """One chat completion; CloudError on a timeout, a refused connection, an HTTP error
        status or an answer that is not an OpenAI chat completion."""
        body = self._body(messages, generation)
        started = time.perf_counter()
        self.requests += 1
        timeout_s = self._section.timeout_s
        try:
            # One deadline from connect to last byte: httpx's own timeout bounds each read, so
            # an endpoint that trickles its answer a byte at a time would never trip it.
            async with asyncio.timeout(timeout_s):
                response = await self._client.post(f"{self._base_url}/chat/completions",
                                                   json=body)
        except TimeoutError as exc:
            raise CloudUnavailable("cloud timeout",
                                   f"no complete answer within {timeout_s:g} s") from exc
        except httpx.TimeoutException as exc:
            raise CloudUnavailable("cloud timeout", type(exc).__name__) from exc
        except httpx.TransportError as exc:
            raise CloudUnavailable("cloud unreachable", type(exc).__name__) from exc
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            # 5xx and 429: the cloud's trouble; any other status answers this request.
            error = (CloudUnavailable if response.status_code >= 500
                     or response.status_code == 429 else CloudError)
            raise error(f"cloud error HTTP {response.status_code}",
                        response.text[:200].replace("\n", " "))
        try:
            reply = response.json()
            choice = reply["choices"][0]
            text = choice["message"].get("content") or ""
            usage = reply.get("usage") or {}
            completion = Completion(
                text=str(text),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                finish_reason=str(choice.get("finish_reason") or ""),
                latency_ms=latency_ms,
            )
            name = str(reply.get("model") or self._section.model)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise CloudError("cloud answer malformed", repr(exc)[:200]) from exc
        # The cloud tells no version or file hash; the endpoint stands in for the path.
        return CloudAnswer(completion, ModelInfo(name=name, version="", sha256="",
                                                 path=self._base_url))

    async def aclose(self) -> None:
        await self._client.aclose()
