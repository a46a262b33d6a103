"""A loopback stub of the Kubernetes API for TrainJobs (Kubeflow Trainer cannot run here) that records requests.

It serves what ctv2v.remote.trainjob uses: create/get/watch/delete of trainer.kubeflow.org/v1alpha1 trainjobs,
listing pods by label and following a pod's log. `outcome` decides how a created job ends: "Complete" or
"Failed" (sent as a watch event), or None (it runs until deleted). A kubeconfig file points clients at it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict | None


@dataclass
class KubeStub:
    namespace: str = "team-a"
    outcome: str | None = "Complete"
    failure: tuple[str, str] = ("PodFailed", "node 1: exit code 1")
    log_lines: tuple[str, ...] = ("rank 0: step 1 loss 0.5", "rank 0: step 2 loss 0.4")
    requests: list[Recorded] = field(default_factory=list)
    jobs: dict[str, dict] = field(default_factory=dict)
    created: threading.Event = field(default_factory=threading.Event)

    def calls(self, method: str | None = None) -> list[tuple[str, str]]:
        """(method, path) of each recorded request, optionally of one method only."""
        return [(r.method, r.path) for r in self.requests if method in (None, r.method)]

    def start(self) -> str:
        stub = self
        base = TRAINJOBS.format(namespace=self.namespace)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _record(self) -> Recorded:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Recorded(self.command, parts.path, parse_qs(parts.query), json.loads(raw) if raw else None)
                stub.requests.append(request)
                return request

            def _reply(self, status: int, payload: dict | str, content_type: str = "application/json") -> None:
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self, what: str) -> None:
                self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                  "message": f"{what} not found", "code": 404})

            def _stream(self, lines: list[str], hold_s: float = 0.0) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for line in lines:
                    data = (line + "\n").encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                time.sleep(hold_s)
                self.wfile.write(b"0\r\n\r\n")

            def do_GET(self) -> None:
                request = self._record()
                path = request.path
                if path == base and request.query.get("watch", [""])[0].lower() == "true":
                    name = request.query["fieldSelector"][0].split("=", 1)[1]
                    job = stub.jobs.get(name)
                    if job is None or stub.outcome is None:
                        self._stream([], hold_s=min(float(request.query.get("timeoutSeconds", ["1"])[0]), 1.0))
                        return
                    if stub.outcome == "Complete":
                        condition = {"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                     "message": "jobs completed", "lastTransitionTime": "2026-12-02T06:00:00Z"}
                    else:
                        reason, message = stub.failure
                        condition = {"type": "Failed", "status": "True", "reason": reason, "message": message,
                                     "lastTransitionTime": "2026-12-02T06:00:00Z"}
                    job["status"] = {"conditions": [condition]}
                    job["metadata"]["resourceVersion"] = "2"
                    self._stream([json.dumps({"type": "MODIFIED", "object": job})])
                elif path.startswith(base + "/"):
                    job = stub.jobs.get(path.rsplit("/", 1)[1])
                    self._reply(200, job) if job is not None else self._not_found(path)
                elif path == f"/api/v1/namespaces/{stub.namespace}/pods":
                    selector = dict(term.split("=", 1) for term in request.query["labelSelector"][0].split(","))
                    name = selector.get("jobset.sigs.k8s.io/jobset-name")
                    items = []
                    if name in stub.jobs and selector.get("batch.kubernetes.io/job-completion-index") == "0":
                        items.append({"metadata": {"name": f"{name}-node-0-0-x7k2p", "namespace": stub.namespace,
                                                   "labels": selector},
                                      "status": {"phase": "Running"}})
                    self._reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                elif path.startswith(f"/api/v1/namespaces/{stub.namespace}/pods/") and path.endswith("/log"):
                    self._reply(200, "".join(line + "\n" for line in stub.log_lines), "text/plain")
                else:
                    self._not_found(path)

            def do_POST(self) -> None:
                request = self._record()
                if request.path != base:
                    self._not_found(request.path)
                    return
                name = request.body["metadata"]["name"]
                if name in stub.jobs:
                    self._reply(409, {"kind": "Status", "status": "Failure", "reason": "AlreadyExists", "code": 409})
                    return
                job = json.loads(json.dumps(request.body))
                job["metadata"].update(resourceVersion="1", uid=f"uid-{name}")
                stub.jobs[name] = job
                stub.created.set()
                self._reply(201, job)

            def do_DELETE(self) -> None:
                request = self._record()
                name = request.path.rsplit("/", 1)[1]
                if request.path.startswith(base + "/") and stub.jobs.pop(name, None) is not None:
                    self._reply(200, {"kind": "Status", "status": "Success", "code": 200})
                else:
                    self._not_found(request.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def write_kubeconfig(self, path: Path, url: str) -> Path:
        """A kubeconfig whose current context is this stub and its namespace (token auth, plain HTTP)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "stub",
            "clusters": [{"name": "stub", "cluster": {"server": url}}],
            "users": [{"name": "pipeline", "user": {"token": "stub-token"}}],
            "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "pipeline",
                                                      "namespace": self.namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
