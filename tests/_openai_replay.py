"""A minimal OpenAI-compatible chat-completions server that replays recorded responses.

Run as a separate process by the endpoint tests (stdlib only)::

    python tests/_openai_replay.py RESPONSES.json LOG_DIR

It binds 127.0.0.1 on a free port and prints ``PORT <n>`` on stdout. Each ``POST
/v1/chat/completions`` is written to ``LOG_DIR/request_<i>.json`` and answered with the i-th
recorded response (a chat.completion object; ``id``/``created``/``model`` are filled in). ``GET
/v1/models`` lists one model. Requests beyond the recording get HTTP 500.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main(responses_path: str, log_dir: str) -> None:
    responses = json.loads(Path(responses_path).read_text("utf-8"))
    log = Path(log_dir)
    log.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    counter = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": "replay", "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            with lock:
                i = counter["n"]
                counter["n"] += 1
            (log / f"request_{i}.json").write_text(json.dumps({"headers": dict(self.headers), "body": body}))
            if i >= len(responses):
                self._send(500, {"error": {"message": f"replay has only {len(responses)} responses"}})
                return
            resp = dict(responses[i])
            resp.setdefault("id", f"chatcmpl-replay-{i}")
            resp.setdefault("object", "chat.completion")
            resp.setdefault("created", int(time.time()))
            resp.setdefault("model", body.get("model", "replay"))
            resp.setdefault("usage", {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
            self._send(200, resp)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
