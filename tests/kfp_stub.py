"""A loopback stub of the KFP v2beta1 API server that records every request (the one remote we cannot run here)."""

from __future__ import annotations

import json
import threading
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
    requests: list[RecordedRequest] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)

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
                    self._reply(200, {"commit_sha": "stub", "tag_name": "2.17.0", "multi_user": False})
                elif path == "/apis/v2beta1/experiments":
                    self._reply(200, {"experiments": list(stub.experiments.values()),
                                      "total_size": len(stub.experiments)})
                elif path.startswith("/apis/v2beta1/runs/"):
                    run = stub.runs.get(path.rsplit("/", 1)[-1])
                    if run is None:
                        self._reply(404, {"error": "run not found"})
                    else:
                        self._reply(200, dict(run, state=stub.run_state))
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
