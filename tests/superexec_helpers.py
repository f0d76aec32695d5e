"""Helpers for the tests of the light ClientApp task loop (edgefl.edge_agent.fl.superexec):
a stand-in for the SuperNode's Runtime API that hands out queued responses, and the
installed loop with a recording ``flwr-clientapp`` first on its ``PATH``."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from flwr.proto import runtime_pb2, task_pb2

from edgefl.edge_agent.fl import superexec

__all__ = ["RuntimeApi", "launched", "start_loop"]


class RuntimeApi:
    """A stand-in for the SuperNode's Runtime API: hands out the queued responses."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.requests: list[dict[str, object]] = []
        self.lock = threading.Lock()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with api.lock:
                    api.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    data = api.queue.pop(0) if api.queue else b""
                self.send_response(200)
                self.send_header("content-type", "application/protobuf")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def task(self, token: str, task_type: str = "flwr-clientapp", task_id: int = 1) -> bytes:
        task = task_pb2.Task(task_id=task_id, type=task_type, run_id=5)
        return runtime_pb2.AcquireTaskResponse(task=task, token=token).SerializeToString()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_loop(
    tmp_path: Path, address: str, parent: int, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], Path]:
    """The installed script, with a ``flwr-clientapp`` that records its argv first on PATH."""
    bin_dir = tmp_path / "bin"
    script = superexec.install(bin_dir)
    record = tmp_path / "launched.jsonl"
    fake = bin_dir / "flwr-clientapp"
    fake.write_text(
        f"#!{sys.executable} -I\nimport json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o700)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [str(script), "--insecure", "--runtime-api-address", address, "--parent-pid", str(parent)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, record


def launched(record: Path) -> list[list[str]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line]
