"""Webhooks of async runs: delivery, signatures, and which failures are retried.

The receiver is a real HTTP server on loopback (http.server in a thread) that
records every request and answers each attempt with the status its script says;
"refused" is a port where nothing listens yet. The server logs every attempt
(runnel.webhooks), which is how a test knows an attempt was made and that delivery
has ended.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

from runnel.runs.webhooks import check_target, sign
from runnel.testing import free_port, request, wait_until

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello" / "main.py"
SECRET = "whsec-test-secret"


class Receiver:
    """An HTTP server answering the i-th request with ``script[i]`` (200 once the script is used up)."""

    def __init__(self, script=(), port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body})
                status = receiver.script.pop(0) if receiver.script else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.send_header("connection", "close")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(script=(), port: int = 0, tls=None) -> Receiver:
        made.append(Receiver(script, port, tls))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def attempts(caplog):
    """``attempts(run_id)``: the runner's log lines about this run's webhook, so far."""
    caplog.set_level(logging.INFO, logger="runnel.webhooks")

    def lines(run_id: str) -> list[str]:
        messages = [r.getMessage() for r in list(caplog.records) if r.name == "runnel.webhooks"]
        return [message for message in messages if run_id in message]

    return lines


def ended(lines: list[str]) -> bool:
    return any("delivered" in line or "giving up" in line for line in lines)


def webhook_server(start_server, **server):
    return start_server({"server": {"runs_path": "", "webhook_allowed_hosts": ["127.0.0.1"],
                                    "webhook_retry_delay": 0.05, **server},
                         "apps": {"hello": {"backend": "python", "module": str(HELLO), "functions": {"public": True}}}})


def submit(server, url: str, name: str = "Ada") -> str:
    reply = request(server.port, "POST", f"/v4/p/hello/greet?async=true&webhookEndpoint={quote(url, safe='')}",
                    body=orjson.dumps({"name": name}))
    assert reply.status == 202, reply.body
    return reply.json()["run_id"]


def status(server, run_id: str) -> dict:
    return request(server.port, "GET", f"/v4/p/hello/runs/{run_id}").json()


# -- delivery ------------------------------------------------------------------------------------


def test_signed_delivery_carries_the_run_status_body(start_server, receivers, attempts):
    receiver = receivers()
    server = webhook_server(start_server, webhook_secret=SECRET)
    run_id = submit(server, receiver.url("/hooks/runs?source=runnel"))
    wait_until(lambda: ended(attempts(run_id)))
    [hook] = receiver.requests
    assert hook["path"] == "/hooks/runs?source=runnel"
    headers, body = hook["headers"], hook["body"]
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == run_id
    assert orjson.loads(body) == status(server, run_id)
    assert orjson.loads(body)["result"] == "Hello, Ada!"
    timestamp = headers["x-webhook-timestamp"]
    assert abs(int(timestamp) - time.time()) < 300
    expected = hmac.new(SECRET.encode(), f"{run_id}.{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers["x-webhook-signature"] == f"v1,{expected}"
    assert sign(SECRET, run_id, int(timestamp), body) == f"v1,{expected}"


def test_without_a_secret_delivery_is_unsigned(start_server, receivers, attempts):
    receiver = receivers()
    server = webhook_server(start_server)
    run_id = submit(server, receiver.url())
    wait_until(lambda: ended(attempts(run_id)))
    [hook] = receiver.requests
    assert "x-webhook-signature" not in hook["headers"] and "x-webhook-timestamp" not in hook["headers"]
    assert orjson.loads(hook["body"])["status"] == "succeeded"


def test_a_failed_run_is_delivered_too(start_server, receivers, attempts):
    receiver = receivers()
    server = webhook_server(start_server)
    target = f"/v4/p/hello/fail?async=true&webhookEndpoint={quote(receiver.url(), safe='')}"
    reply = request(server.port, "POST", target, body=b'{"message": "nope"}')
    run_id = reply.json()["run_id"]
    wait_until(lambda: ended(attempts(run_id)))
    body = orjson.loads(receiver.requests[0]["body"])
    assert (body["status"], body["status_code"], body["error"]["code"]) == ("failed", 500, "function_error")


# -- retries -----------------------------------------------------------------------------------------


def test_connection_refused_then_delivered(start_server, receivers, attempts):
    port = free_port()  # nothing listens there yet
    server = webhook_server(start_server, webhook_retry_delay=1.0)
    run_id = submit(server, f"http://127.0.0.1:{port}/hook")
    wait_until(lambda: any("attempt 1 failed" in line for line in attempts(run_id)))
    receiver = receivers(port=port)  # listening before the retry, a second later
    wait_until(lambda: ended(attempts(run_id)))
    assert len(receiver.requests) == 1
    assert "delivered" in attempts(run_id)[-1] and "attempt 2" in attempts(run_id)[-1]


def test_refused_three_times_gives_up(start_server, attempts):
    server = webhook_server(start_server)
    run_id = submit(server, f"http://127.0.0.1:{free_port()}/hook")
    wait_until(lambda: ended(attempts(run_id)))
    lines = attempts(run_id)
    assert len(lines) == 3 and "attempt 3 failed" in lines[-1] and "giving up" in lines[-1]


def test_404_is_retried_then_delivered(start_server, receivers, attempts):
    receiver = receivers([404])
    server = webhook_server(start_server)
    run_id = submit(server, receiver.url())
    wait_until(lambda: ended(attempts(run_id)))
    assert len(receiver.requests) == 2
    assert receiver.requests[0]["body"] == receiver.requests[1]["body"]
    assert "delivered" in attempts(run_id)[-1]


def test_three_404s_give_up_after_three_attempts(start_server, receivers, attempts):
    receiver = receivers([404, 404, 404, 200])
    server = webhook_server(start_server)
    run_id = submit(server, receiver.url())
    wait_until(lambda: ended(attempts(run_id)))
    assert len(receiver.requests) == 3
    assert "giving up" in attempts(run_id)[-1]


@pytest.mark.parametrize("answer", [500, 503, 400, 401, 410])
def test_other_statuses_are_not_retried(start_server, receivers, attempts, answer):
    receiver = receivers([answer])
    server = webhook_server(start_server)
    run_id = submit(server, receiver.url())
    wait_until(lambda: ended(attempts(run_id)))
    assert len(receiver.requests) == 1
    assert f"HTTP {answer}" in attempts(run_id)[-1] and "giving up" in attempts(run_id)[-1]


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runnel test receiver")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_delivery_verifies_the_certificate(start_server, receivers, attempts, tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    receiver = receivers(tls=tls)
    server = webhook_server(start_server)
    untrusted = submit(server, receiver.url())  # the system's CAs do not know this certificate
    wait_until(lambda: ended(attempts(untrusted)))
    assert receiver.requests == [] and "giving up" in attempts(untrusted)[-1]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted from now on
    trusted = submit(server, receiver.url())
    wait_until(lambda: ended(attempts(trusted)))
    [hook] = receiver.requests
    assert orjson.loads(hook["body"])["run_id"] == trusted


# -- RunPod jobs use the same webhooks --------------------------------------------------------------


def test_runpod_job_webhook_gets_the_job_status(start_server, receivers, attempts):
    receiver = receivers()
    server = start_server({"server": {"runs_path": "", "webhook_allowed_hosts": ["127.0.0.1"]},
                           "apps": {"hello": {"backend": "python", "module": str(HELLO),
                                              "runpod": {"handler": "greet"}}}})
    reply = request(server.port, "POST", "/v2/hello/run",
                    body=orjson.dumps({"input": {"name": "Cy"}, "webhook": receiver.url()}))
    job_id = reply.json()["id"]
    wait_until(lambda: ended(attempts(job_id)))
    body = orjson.loads(receiver.requests[0]["body"])
    assert (body["id"], body["status"], body["output"]) == (job_id, "COMPLETED", "Hello, Cy!")


# -- targets --------------------------------------------------------------------------------------------


def test_check_target():
    allowed = ["hooks.example", "127.0.0.1:8080", "::1"]
    assert check_target("https://HOOKS.example/x?y=1", allowed) == "https://HOOKS.example/x?y=1"
    assert check_target("http://127.0.0.1:8080/", allowed)
    assert check_target("http://[::1]:9/", allowed)
    for url in ("http://127.0.0.1:8081/", "http://127.0.0.1/", "https://hooks.example.org/", "ftp://hooks.example/",
                "http:///x", "http://hooks.example:99999/", "http://hooks.example/a b", "", None):
        with pytest.raises(ValueError):
            check_target(url, allowed)
    with pytest.raises(ValueError):
        check_target("http://hooks.example/", [])  # nothing allowed by default
