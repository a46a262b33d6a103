"""A loopback stub of the KFP v2beta1 API server that records every request (the one remote we cannot run here)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased header names."""
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class KfpStub:
    run_state: str = "SUCCEEDED"
    """State every poll of a run reports, after the states in `run_states_before` are used up."""
    run_states_before: list[str] = field(default_factory=list)
    """States the first polls report, in order (e.g. RUNNING while a test renews a token)."""
    on_run_poll: Callable[[int], None] | None = None
    """Called with the poll's number (1, 2, ...) before each answer to GET /runs/<id>."""
    server_version: str = "2.17.0"
    """The `tag_name` healthz reports: the KFP release of the server."""
    requests: list[RecordedRequest] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)

    polls: int = 0

    def start(self) -> str:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _record(self) -> RecordedRequest:
                length = int(self.headers.get("Content-Length") or 0)
                request = RecordedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                          self.rfile.read(length))
                stub.requests.append(request)
                return request

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                request = self._record()
                path = request.path.split("?")[0]
                if path == "/apis/v2beta1/healthz":
                    self._reply(200, {"commit_sha": "stub", "tag_name": stub.server_version, "multi_user": False})
                elif path == "/apis/v2beta1/experiments":
                    self._reply(200, {"experiments": list(stub.experiments.values()),
                                      "total_size": len(stub.experiments)})
                elif path.startswith("/apis/v2beta1/runs/"):
                    run = stub.runs.get(path.rsplit("/", 1)[-1])
                    if run is None:
                        self._reply(404, {"error": "run not found"})
                    else:
                        stub.polls += 1
                        if stub.on_run_poll is not None:
                            stub.on_run_poll(stub.polls)
                        state = stub.run_states_before.pop(0) if stub.run_states_before else stub.run_state
                        self._reply(200, dict(run, state=state))
                else:
                    self._reply(404, {"error": f"stub has no GET {path}"})

            def do_POST(self) -> None:
                request = self._record()
                path = request.path.split("?")[0]
                if path == "/apis/v2beta1/experiments":
                    body = request.json()
                    experiment = dict(body, experiment_id=f"exp-{len(stub.experiments) + 1}")
                    stub.experiments[experiment["experiment_id"]] = experiment
                    self._reply(200, experiment)
                elif path == "/apis/v2beta1/runs":
                    body = request.json()
                    run = dict(body, run_id=f"run-{len(stub.runs) + 1}", state="PENDING")
                    stub.runs[run["run_id"]] = run
                    self._reply(200, run)
                elif path == "/apis/v2beta1/pipelines/upload":
                    self._reply(200, {"pipeline_id": "pipeline-1", "display_name": "ctv2v"})
                else:
                    self._reply(404, {"error": f"stub has no POST {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
