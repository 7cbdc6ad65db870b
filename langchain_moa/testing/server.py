"""A scripted OpenAI-compatible HTTP server on 127.0.0.1, for tests and benchmarks.

MoA's value is in how it talks to real providers: concurrent HTTP calls, streaming, retries,
tool calls. This server lets tests and benchmarks drive real `ChatOpenAI` clients over real
HTTP with per-model latency, failures, empty answers, streaming pace and tool calls, and
records every request so tests can check exactly what was sent. It binds loopback only and
uses the standard library's threading HTTP server (one thread per connection), so
concurrent requests overlap like they do against a provider.

With no explicit reply, a model answers "sensibly enough" for LangChain's standard
integration suite: tool calls with arguments synthesised from the tool's JSON schema and the
user's text, JSON that fits a requested ``response_format``, text that quotes tool results.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "sk-scripted-test"

Reply = str | Callable[[dict[str, Any]], str]


@dataclass
class ModelScript:
    """How one model name behaves."""

    reply: Reply | None = None
    """Fixed text, or a function of the request body; None = the smart default."""
    latency: float = 0.0
    """Seconds before the first byte."""
    lognormal: tuple[float, float] | None = None
    """Heavy-tailed latency ``(median_s, sigma)`` added per request, drawn from a seed that
    is the hash of the request (model and messages): the same request always waits the
    same time, so two policies compared on the same prompts see the same latencies."""
    token_delay: float = 0.0
    """Seconds between streamed chunks."""
    fail_times: int = 0
    """The first N requests fail with `fail_status`."""
    fail_always: bool = False
    fail_status: int = 500
    empty: bool = False
    """Answer with an empty string."""
    tool_calls: list[dict[str, Any]] | None = None
    """Explicit tool calls to return (each ``{"name": ..., "arguments": {...}}``)."""
    reject_key: bool = False
    """Answer 401 quoting the caller's key back, as OpenAI does for a wrong key: the
    ``X-Api-Key`` / ``Api-Key`` header when sent, else the password of Basic auth (a base
    URL with ``user:KEY@``), else the Bearer token."""
    no_choices: bool = False
    """Answer 200 with an empty ``choices`` list (seen from some gateways)."""
    token_logprobs: Callable[[str, dict[str, Any]], dict[str, float]] | None = None
    """With it, a request that sets ``logprobs`` gets OpenAI's ``logprobs.content``: one
    entry per token of the answer (tokens as streamed). The function of (token, request
    body) gives the alternatives at that position, ``{token: logprob}``, best first: the
    token's own logprob is its entry (-1.0 if absent), and the first ``top_logprobs``
    alternatives are listed."""


@dataclass
class RecordedRequest:
    """One request as the server saw it (the Authorization header is redacted)."""

    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    started: float
    finished: float | None = None
    status: int = 200

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return self.body.get("tools")

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


# ---------------------------------------------------------------- smart replies


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


def _last(messages: list[dict[str, Any]], role: str) -> dict[str, Any] | None:
    for message in reversed(messages):
        if message.get("role") == role:
            return message
    return None


def request_latency(
    model: str, body: dict[str, Any], lognormal: tuple[float, float] | None
) -> float:
    """A lognormal latency fixed by the request's content (0 when no distribution is set)."""
    if lognormal is None:
        return 0.0
    median, sigma = lognormal
    digest = hashlib.sha256(
        json.dumps([model, body.get("messages")], sort_keys=True).encode()
    ).digest()
    return random.Random(digest).lognormvariate(math.log(median), sigma)


def count_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: words and punctuation runs."""
    return len(re.findall(r"\w+|[^\w\s]", text))


class _Synth:
    """Values for a JSON schema, taken from the user's text where it offers them."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", text)]
        self.quoted = re.findall(r"[\"“']([^\"”']{1,80})[\"”']", text)

    def value(self, schema: dict[str, Any], name: str, defs: dict[str, Any]) -> Any:
        if "$ref" in schema:
            schema = defs.get(schema["$ref"].split("/")[-1], {})
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
                return self.value(options[0], name, defs)
        if "allOf" in schema:
            return self.value(schema["allOf"][0], name, defs)
        if "enum" in schema:
            return schema["enum"][0]
        if "const" in schema:
            return schema["const"]
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "string")
        if kind == "object" or "properties" in schema:
            return self.object(schema, defs)
        if kind == "array":
            return [self.value(schema.get("items", {"type": "string"}), name, defs)]
        if kind == "integer":
            return int(self.numbers.pop(0)) if self.numbers else 1
        if kind == "number":
            return self.numbers.pop(0) if self.numbers else 1.0
        if kind == "boolean":
            return True
        if self.quoted:
            return self.quoted.pop(0)
        return _filler(name, self.text)

    def object(self, schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
        defs = {**defs, **schema.get("$defs", {}), **schema.get("definitions", {})}
        properties = schema.get("properties", {})
        return {key: self.value(sub, key, defs) for key, sub in properties.items()}


def _filler(name: str, text: str) -> str:
    lowered = name.lower()
    if "location" in lowered or "city" in lowered:
        match = re.search(r"\bin ([A-Z][\w\s]+?)[?.!]", text)
        return match.group(1).strip() if match else "San Francisco"
    if "setup" in lowered:
        return "Why did the cat sit on the computer?"
    if "punchline" in lowered:
        return "To keep an eye on the mouse."
    return f"{name} from scripted server"


def _pick_tool(tools: list[dict[str, Any]], tool_choice: Any, text: str) -> dict[str, Any]:
    functions = [t.get("function", t) for t in tools]
    if isinstance(tool_choice, dict):
        wanted = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
        for f in functions:
            if f.get("name") == wanted:
                return f
    lowered = text.lower()
    for f in functions:
        if f.get("name", "").lower() in lowered:
            return f
    return functions[0]


def _wants_tool(body: dict[str, Any]) -> bool:
    tools = body.get("tools")
    if not tools:
        return False
    choice = body.get("tool_choice")
    if choice == "none":
        return False
    if choice in ("required", "any") or isinstance(choice, dict):
        return True
    last = body.get("messages", [])[-1] if body.get("messages") else {}
    return last.get("role") == "user"


def smart_reply(model: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The default answer: (text, tool_calls) for a request with no scripted reply."""
    messages = body.get("messages", [])
    user = _last(messages, "user")
    user_text = _text_of(user.get("content")) if user else ""
    if _wants_tool(body):
        function = _pick_tool(body["tools"], body.get("tool_choice"), user_text)
        args = _Synth(user_text).object(function.get("parameters") or {}, {})
        return "", [{"name": function["name"], "arguments": args}]
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return f"The tool returned: {_text_of(last.get('content'))}", []
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        schema = response_format.get("json_schema", {}).get("schema", {})
        return json.dumps(_Synth(user_text).object(schema, {}), ensure_ascii=False), []
    if response_format.get("type") == "json_object":
        keys = re.findall(r"`(\w+)`", user_text) or re.findall(r"'(\w+)'", user_text)
        obj = {k: _filler(k, user_text) for k in keys} or {"answer": f"{model} says hello"}
        return json.dumps(obj, ensure_ascii=False), []
    summary = " ".join(user_text.split())[:60]
    return f"[{model}] answer to: {summary}", []


def _tokens(text: str) -> list[str]:
    """Split into small streamable pieces that concatenate back to `text`."""
    return re.findall(r"\S+\s*|\s+", text) or ([text] if text else [])


# ------------------------------------------------------------------------ server


class ScriptedOpenAIServer:
    """Context manager running the scripted server on 127.0.0.1 (ephemeral port)."""

    def __init__(
        self, scripts: dict[str, ModelScript] | None = None, default: ModelScript | None = None
    ) -> None:
        self._scripts: dict[str, ModelScript] = dict(scripts or {})
        self._default = default or ModelScript()
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self.requests: list[RecordedRequest] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------- lifecycle
    def start(self) -> ScriptedOpenAIServer:
        handler = _make_handler(self)
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="scripted-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ScriptedOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --------------------------------------------------------------- scripts
    def set_script(self, model: str, script: ModelScript) -> None:
        with self._lock:
            self._scripts[model] = script
            self._counts.pop(model, None)

    def script_for(self, model: str) -> ModelScript:
        return self._scripts.get(model, self._default)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._counts.clear()

    def requests_for(self, model: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.model == model]

    def chat_model(self, model: str, **kwargs: Any) -> Any:
        """A `ChatOpenAI` client bound to this server (extra kwargs pass through)."""
        from langchain_openai import ChatOpenAI

        kwargs.setdefault("stream_usage", True)
        return ChatOpenAI(model=model, base_url=self.base_url, api_key=API_KEY, **kwargs)

    def _next_count(self, model: str) -> int:
        with self._lock:
            self._counts[model] = self._counts.get(model, 0) + 1
            return self._counts[model]

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _completion(model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A ``chat.completion`` body around `choices`."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) refuses connections when a benchmark opens a hundred
    # at once (24 MoA runs x 4 proposers); providers accept them.
    request_queue_size = 512


def _make_handler(server: ScriptedOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def handle(self) -> None:
            # A client that gives up (timeout, cancelled proposer) closes its socket:
            # that is expected traffic, not a server error worth a traceback.
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        # ----------------------------------------------------------- helpers
        def _send_json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _sse(self, payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            chunk = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()

        # ---------------------------------------------------------- routes
        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                names = sorted(server._scripts) or ["scripted"]
                self._send_json(
                    200,
                    {"object": "list", "data": [{"id": n, "object": "model"} for n in names]},
                )
            else:
                self._send_json(404, {"error": {"message": "not found", "type": "not_found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b"{}"
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send_json(404, {"error": {"message": "not found", "type": "not_found"}})
                return
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                self._send_json(400, {"error": {"message": "invalid JSON", "type": "bad_request"}})
                return
            model = str(body.get("model", "scripted"))
            caller_key = _caller_key(self.headers)
            headers = {
                k: ("REDACTED" if k.lower() in ("authorization", "api-key") else v)
                for k, v in self.headers.items()
            }
            record = RecordedRequest(
                model=model, body=body, headers=headers, started=time.perf_counter()
            )
            server._record(record)
            script = server.script_for(model)
            count = server._next_count(model)
            delay = script.latency + request_latency(model, body, script.lognormal)
            if delay:
                time.sleep(delay)
            if script.reject_key:
                record.status = 401
                record.finished = time.perf_counter()
                message = f"Incorrect API key provided: {caller_key}. You can find your API key at https://platform.openai.com/account/api-keys."
                self._send_json(
                    401,
                    {
                        "error": {
                            "message": message,
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                )
                return
            if script.no_choices and not body.get("stream"):
                record.finished = time.perf_counter()
                self._send_json(200, _completion(model, []))
                return
            if script.fail_always or count <= script.fail_times:
                record.status = script.fail_status
                record.finished = time.perf_counter()
                self._send_json(
                    script.fail_status,
                    {
                        "error": {
                            "message": f"scripted failure {count} for model {model}",
                            "type": "server_error"
                            if script.fail_status >= 500
                            else "invalid_request_error",
                            "code": str(script.fail_status),
                        }
                    },
                )
                return
            text, tool_calls = self._answer(model, body, script)
            if body.get("stream"):
                self._stream(model, body, script, text, tool_calls)
            else:
                self._complete(model, body, text, tool_calls)
            record.finished = time.perf_counter()

        # --------------------------------------------------------- answers
        def _answer(
            self, model: str, body: dict[str, Any], script: ModelScript
        ) -> tuple[str, list[dict[str, Any]]]:
            if script.empty:
                return "", []
            if script.tool_calls is not None and body.get("tools"):
                return "", list(script.tool_calls)
            if script.reply is None:
                return smart_reply(model, body)
            text = script.reply(body) if callable(script.reply) else script.reply
            return str(text), []

        @staticmethod
        def _limits(body: dict[str, Any], text: str) -> tuple[str, str]:
            finish = "stop"
            for stop in body.get("stop") or []:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            cap = body.get("max_completion_tokens") or body.get("max_tokens")
            if cap is not None:
                pieces = _tokens(text)
                if len(pieces) > cap:
                    text, finish = "".join(pieces[:cap]), "length"
            return text, finish

        def _logprobs(self, model: str, body: dict[str, Any], text: str) -> dict[str, Any]:
            alternatives = server.script_for(model).token_logprobs
            if alternatives is None or not body.get("logprobs"):
                return {}
            content = []
            for token in _tokens(text):
                at = alternatives(token, body)
                top = [
                    {"token": t, "logprob": lp, "bytes": list(t.encode())}
                    for t, lp in list(at.items())[: body.get("top_logprobs") or 0]
                ]
                own = at.get(token, -1.0)
                content.append(
                    {
                        "token": token,
                        "logprob": own,
                        "bytes": list(token.encode()),
                        "top_logprobs": top,
                    }  # fmt: skip
                )
            return {"logprobs": {"content": content}}

        @staticmethod
        def _usage(body: dict[str, Any], completion: str) -> dict[str, int]:
            prompt = sum(count_tokens(_text_of(m.get("content"))) for m in body.get("messages", []))
            out = count_tokens(completion)
            return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}

        def _complete(
            self, model: str, body: dict[str, Any], text: str, tool_calls: list[dict[str, Any]]
        ) -> None:
            text, finish = self._limits(body, text)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                finish = "tool_calls"
                message["content"] = text or None
                message["tool_calls"] = [
                    {
                        "id": f"call_{uuid.uuid4().hex[:12]}",
                        "type": "function",
                        "function": {
                            "name": call["name"],
                            "arguments": json.dumps(call["arguments"], ensure_ascii=False),
                        },
                    }
                    for call in tool_calls
                ]
            completion = text + "".join(json.dumps(c["arguments"]) for c in tool_calls)
            choice = {"index": 0, "message": message, "finish_reason": finish}
            choice.update(self._logprobs(model, body, text))
            self._send_json(200, _completion(model, [choice], usage=self._usage(body, completion)))

        def _stream(
            self,
            model: str,
            body: dict[str, Any],
            script: ModelScript,
            text: str,
            tool_calls: list[dict[str, Any]],
        ) -> None:
            text, finish = self._limits(body, text)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
            created = int(time.time())

            def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
                return {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                }

            self._sse(chunk({"role": "assistant", "content": ""}))
            for i, piece in enumerate(_tokens(text)):
                if i and script.token_delay:
                    time.sleep(script.token_delay)
                self._sse(chunk({"content": piece}))
            for index, call in enumerate(tool_calls):
                arguments = json.dumps(call["arguments"], ensure_ascii=False)
                self._sse(
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": index,
                                    "id": f"call_{uuid.uuid4().hex[:12]}",
                                    "type": "function",
                                    "function": {"name": call["name"], "arguments": ""},
                                }
                            ]
                        }
                    )
                )
                half = len(arguments) // 2
                for fragment in (arguments[:half], arguments[half:]):
                    if script.token_delay:
                        time.sleep(script.token_delay)
                    self._sse(
                        chunk(
                            {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
                        )
                    )
            self._sse(chunk({}, "tool_calls" if tool_calls else finish))
            if (body.get("stream_options") or {}).get("include_usage"):
                completion = text + "".join(json.dumps(c["arguments"]) for c in tool_calls)
                self._sse(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": self._usage(body, completion),
                    }
                )
            self._sse("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


def _caller_key(headers: Any) -> str:
    """The credential a request carries (see `ModelScript.reject_key`)."""
    explicit = headers.get("X-Api-Key") or headers.get("Api-Key")
    if explicit:
        return explicit
    authorization = headers.get("Authorization") or ""
    if authorization.startswith("Basic "):
        import base64
        import binascii

        try:
            pair = base64.b64decode(authorization.removeprefix("Basic ")).decode()
        except (binascii.Error, UnicodeDecodeError):
            return authorization
        return pair.partition(":")[2]
    return authorization.removeprefix("Bearer ")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers a test or benchmark starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moa_serve(
    config: Any,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    args: Sequence[str] = (),
) -> tuple[str, Any]:
    """``moa serve --config CONFIG`` on a free loopback port, started as a user starts it.

    Returns ``(base URL of the /moa routes, process)`` once the server answers; stdout and
    stderr are pipes (read them after ``terminate()``). Raises if it exits or never answers.
    """
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "langchain_moa.cli", "serve", "--config", str(config),
         "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/moa"
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"{base}/input_schema", timeout=2)
            return base, process
        except httpx.HTTPError:
            if process.poll() is not None:
                raise RuntimeError(f"moa serve exited: {process.communicate()[1]}") from None
            if time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"moa serve did not answer within {timeout:g} s") from None
            time.sleep(0.2)


def serve_in_subprocess(scripts: dict[str, dict[str, Any]]) -> tuple[str, Any]:
    """Start the server in its own process: ``(base_url, process)``; stop with terminate().

    For benchmarks: in-process, the server's threads share the client's GIL, and at a
    hundred requests a second that contention is measured as provider latency. `scripts`
    maps model names to `ModelScript` keyword arguments (plain JSON: replies as strings).
    """
    import subprocess
    import sys

    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from langchain_moa.testing.server import serve_forever; "
            "serve_forever(sys.argv[1])",
            json.dumps(scripts),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process.stdout.readline().strip(), process


def serve_forever(specs_json: str) -> None:
    """Run a server for `serve_in_subprocess`: print its base URL, then serve until killed."""
    specs = json.loads(specs_json)
    server = ScriptedOpenAIServer(
        scripts={
            name: ModelScript(**{k: tuple(v) if k == "lognormal" else v for k, v in spec.items()})
            for name, spec in specs.items()
        }
    ).start()
    print(server.base_url, flush=True)
    threading.Event().wait()
