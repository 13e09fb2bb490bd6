"""A small stand-in of Anthropic's Messages API, on loopback, for running the real Claude Code CLI.

Tests point the CLI at it with ``ANTHROPIC_BASE_URL`` (see ``tests/claude_cli.py``) and script
what "the model" answers, turn by turn::

    with FakeMessagesAPI() as api:
        api.script([
            [{"type": "text", "text": "I'll create it."},
             {"type": "tool_use", "name": "Write",
              "input": {"file_path": str(cwd / "a.txt"), "content": "hi\\n"}}],
            [{"type": "text", "text": "Done."}],
        ])
        run claude with claude_env(home, api.base_url) ...
        api.requests   # JSON bodies of the scripted (main-loop) POST /v1/messages calls

Each scripted reply is either a list of content blocks (``text`` / ``tool_use``; tool_use ids are
generated when missing; ``stop_reason`` is "tool_use" when a tool_use block is present, else
"end_turn") or an error ``{"error": 500}`` (any status; optional ``"message"``) answered with the
API's JSON error body ``{"type": "error", "error": {"type": "api_error", "message": ...}}``.
An exhausted script answers with the text "(script exhausted)".

Endpoints:
    POST /v1/messages               streamed as SSE when the body says ``"stream": true``
                                    (message_start, content_block_start/delta/stop,
                                    message_delta, message_stop), else one Message JSON
    POST /v1/messages/count_tokens  {"input_tokens": N}, N a rough estimate
    anything else                   404 with a not_found_error JSON body

Side requests: besides its agent loop the CLI may make calls of its own. 2.1.197 without
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`` asks, with the main model and no ``tools``, for a
session title; with that variable set (as ``claude_env`` does) nothing but the loop was seen.
Only requests that carry ``tools`` consume the script; the others get a short text answer and
land in ``side_requests``. Every hit, main or side, is in ``hits`` as ``(method, path)``; the CLI
starts with a ``HEAD /`` warm-up, answered 404 with no body.

Query strings are ignored (the CLI posts to ``/v1/messages?beta=true``). Nothing here is secure:
it binds 127.0.0.1 only and is meant for tests.
"""

import http.server
import itertools
import json
import sys
import threading
import uuid
from http import HTTPStatus
from typing import Any, Dict, List, Optional, Union

# ---------------------------------------------------------------------------------------------
# Constants

EXHAUSTED_TEXT = "(script exhausted)"
SIDE_REPLY_TEXT = "OK"
MAX_BODY_BYTES = 64 * 1024 * 1024
CREDENTIAL_HEADERS = ("x-api-key", "authorization", "anthropic-beta")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

Reply = Union[List[Dict[str, Any]], Dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Reply building (pure functions: a reply, as the list of SSE events or the Message object)

def _tokens(value: Any) -> int:
    """A rough token count (4 characters a token): enough for usage fields to look plausible."""
    return max(1, len(json.dumps(value)) // 4)


def _with_ids(blocks: List[Dict[str, Any]], counter) -> List[Dict[str, Any]]:
    """Copies of the blocks, tool_use ones given an ``id`` and an ``input`` when they lack one."""
    out = []
    for block in blocks:
        block = dict(block)
        if block.get("type") == "tool_use":
            block.setdefault("id", "toolu_%024d" % next(counter))
            block.setdefault("input", {})
        out.append(block)
    return out


def build_message(blocks: List[Dict[str, Any]], model: str, input_tokens: int) -> Dict[str, Any]:
    """The complete Message object for content blocks, as a non-streaming call returns it."""
    has_tool = any(b.get("type") == "tool_use" for b in blocks)
    return {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": "tool_use" if has_tool else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": _tokens(blocks),
        },
    }


def _block_events(index: int, block: Dict[str, Any]) -> List[Dict[str, Any]]:
    """content_block_start, deltas and content_block_stop for one block, as the API streams it."""
    kind = block.get("type")
    if kind == "tool_use":
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        payload = json.dumps(block["input"])
        # The API sends the input as several partial-JSON pieces, the first often empty.
        pieces = [""] + [payload[i:i + 40] for i in range(0, len(payload), 40)]
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
    elif kind == "text":
        start = {"type": "text", "text": ""}
        text = block.get("text", "")
        deltas = [{"type": "text_delta", "text": text[i:i + 40]}
                  for i in range(0, len(text), 40)] or [{"type": "text_delta", "text": ""}]
    else:
        raise ValueError("scripted block of unsupported type %r" % (kind,))
    events = [{"type": "content_block_start", "index": index, "content_block": start}]
    events += [{"type": "content_block_delta", "index": index, "delta": d} for d in deltas]
    events.append({"type": "content_block_stop", "index": index})
    return events


def build_stream(message: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The SSE events of a streamed Message, in the API's order."""
    head = dict(message, content=[], stop_reason=None, stop_sequence=None,
                usage=dict(message["usage"], output_tokens=1))
    events = [{"type": "message_start", "message": head}, {"type": "ping"}]
    for index, block in enumerate(message["content"]):
        events += _block_events(index, block)
    events.append({
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": message["usage"]["output_tokens"]},
    })
    events.append({"type": "message_stop"})
    return events


def error_body(status: int, message: Optional[str] = None) -> Dict[str, Any]:
    """The API's JSON error body for an HTTP status."""
    kind = ERROR_TYPES.get(status, "api_error")
    return {"type": "error",
            "error": {"type": kind, "message": message or "stand-in %s (%d)" % (kind, status)}}


def is_side_request(body: Dict[str, Any]) -> bool:
    """True for the CLI's own helper calls (a session title, ...): the agent loop sends tools."""
    return not body.get("tools")


# ---------------------------------------------------------------------------------------------
# HTTP transport

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeMessagesAPI/1"
    timeout = 30  # a stuck client never pins a thread for long

    @property
    def api(self) -> "FakeMessagesAPI":
        return self.server.api  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # quiet: tests read .hits instead

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_" + uuid.uuid4().hex[:24])
        self.end_headers()
        self.wfile.write(data)

    def _send_sse(self, events: List[Dict[str, Any]]) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("request-id", "req_" + uuid.uuid4().hex[:24])
        self.end_headers()
        self.close_connection = True
        for event in events:
            frame = "event: %s\ndata: %s\n\n" % (event["type"], json.dumps(event))
            self.wfile.write(frame.encode())
            self.wfile.flush()

    def _read_json(self) -> Optional[Dict[str, Any]]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, error_body(413))
            return None
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._send_json(HTTPStatus.BAD_REQUEST, error_body(400, "body is not JSON"))
            return None

    def do_GET(self):
        self.api._hit(self.command, self.path)
        self._send_json(HTTPStatus.NOT_FOUND, error_body(404, "no route " + self._path()))

    do_PUT = do_DELETE = do_PATCH = do_GET

    def do_HEAD(self):
        # The CLI opens with "HEAD /" to warm up a connection; a HEAD answer has no body.
        self.api._hit(self.command, self.path)
        self.send_response(HTTPStatus.NOT_FOUND)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        self.api._hit(self.command, self.path, self.headers)
        path = self._path()
        if path not in ("/v1/messages", "/v1/messages/count_tokens"):
            self._send_json(HTTPStatus.NOT_FOUND, error_body(404, "no route " + path))
            return
        body = self._read_json()
        if body is None:
            return
        if path.endswith("/count_tokens"):
            self._send_json(HTTPStatus.OK, {"input_tokens": _tokens(body.get("messages"))})
            return
        reply = self.api._next_reply(body)
        if isinstance(reply, dict):
            status = int(reply["error"])
            self._send_json(status, error_body(status, reply.get("message")))
            return
        message = build_message(reply, body.get("model", "claude-stand-in"),
                                _tokens(body.get("messages")))
        if body.get("stream"):
            self._send_sse(build_stream(message))
        else:
            self._send_json(HTTPStatus.OK, message)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # The CLI exits with idle keep-alive connections open: a reset then is normal, not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


# ---------------------------------------------------------------------------------------------
# The stand-in

class FakeMessagesAPI:
    """A scripted Messages API on 127.0.0.1:<free port>; a context manager that starts and stops it."""

    def __init__(self, replies: Optional[List[Reply]] = None):
        self._lock = threading.Lock()
        self._queue: List[Reply] = []
        self._requests: List[Dict[str, Any]] = []
        self._side_requests: List[Dict[str, Any]] = []
        self._hits: List[tuple] = []
        self._credentials: List[Dict[str, str]] = []
        self._ids = itertools.count(1)
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        if replies:
            self.script(replies)

    # -- lifecycle

    def start(self) -> "FakeMessagesAPI":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.api = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> "FakeMessagesAPI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return "http://%s:%d" % (host, port)

    # -- script and observations

    def script(self, replies: List[Reply]) -> None:
        """Append replies to the queue; each scripted (main-loop) request takes the next one."""
        for reply in replies:
            if not isinstance(reply, (list, dict)) or (isinstance(reply, dict)
                                                       and "error" not in reply):
                raise ValueError("a reply is a list of content blocks or {'error': status}")
            with self._lock:
                self._queue.append(_with_ids(reply, self._ids) if isinstance(reply, list)
                                   else dict(reply))

    @property
    def pending(self) -> int:
        """How many scripted replies have not been asked for yet."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> List[Dict[str, Any]]:
        """JSON bodies of the main-loop POST /v1/messages calls, in order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def side_requests(self) -> List[Dict[str, Any]]:
        """JSON bodies of the CLI's own helper calls, answered without touching the script."""
        with self._lock:
            return list(self._side_requests)

    @property
    def hits(self) -> List[tuple]:
        """Every request received, as (method, path with query)."""
        with self._lock:
            return list(self._hits)

    @property
    def credentials(self) -> List[Dict[str, str]]:
        """For each POST, the headers that carry or qualify a credential (CREDENTIAL_HEADERS)."""
        with self._lock:
            return list(self._credentials)

    # -- called by the handler

    def _hit(self, method: str, path: str, headers: Any = None) -> None:
        with self._lock:
            self._hits.append((method, path))
            if headers is not None:
                self._credentials.append({k.lower(): v for k, v in headers.items()
                                          if k.lower() in CREDENTIAL_HEADERS})

    def _next_reply(self, body: Dict[str, Any]) -> Reply:
        with self._lock:
            if is_side_request(body):
                self._side_requests.append(body)
                return [{"type": "text", "text": SIDE_REPLY_TEXT}]
            self._requests.append(body)
            if self._queue:
                return self._queue.pop(0)
            return [{"type": "text", "text": EXHAUSTED_TEXT}]
