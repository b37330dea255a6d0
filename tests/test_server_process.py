"""Integration: a real ``twistd -n kvstore`` process, real sockets, real clients."""

from __future__ import annotations

import resource
import signal
import socket
import ssl
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import serverproc
from serverproc import ServerProcess, start_server, twistd


def exchange(sock: socket.socket, requests: bytes, replies: int) -> list[bytes]:
    """Send ``requests`` in one write and read exactly ``replies`` reply lines."""
    return serverproc.exchange(sock, requests, replies).split(b"\n")[:-1]


def read_to_eof(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.fixture(scope="module")
def shared_server() -> ServerProcess:
    """One server for the tests that do not care what others stored."""
    server = start_server()
    yield server
    server.stop()


def test_300_concurrent_clients_share_one_store(shared_server: ServerProcess) -> None:
    n, base = 300, 1_000_000
    sockets = [shared_server.connect() for _ in range(n)]
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            puts = list(pool.map(lambda i: exchange(sockets[i], b"put %d %d\n" % (base + i, i * 7), 1), range(n)))
            assert puts == [[b"OK"]] * n
            everything = b"".join(b"get %d\n" % (base + i) for i in range(n))
            reads = list(pool.map(lambda i: exchange(sockets[i], everything, n), range(n)))
        expected = [str(i * 7).encode() for i in range(n)]
        assert all(r == expected for r in reads)
    finally:
        for s in sockets:
            s.close()


def test_20000_pipelined_requests_in_one_write(shared_server: ServerProcess) -> None:
    n, base = 10000, 2_000_000
    requests = b"".join(b"put %d %d\n" % (base + k, -k) for k in range(n))
    requests += b"".join(b"get %d\n" % (base + k) for k in range(n))
    with shared_server.connect() as sock:
        replies = exchange(sock, requests, 2 * n)
    assert replies == [b"OK"] * n + [str(-k).encode() for k in range(n)]


@pytest.mark.parametrize(
    "bad",
    [b"frobnicate 1", b"put 1", b"get 1 2", b"put 1_000 1", b"put 1e3 1", b"put 0x10 1",
     b"put 99999999999999999999 1", b"put \xd9\xa1 1", b"\x1b[2Jget \x1b]0;pwned\x07"],
)
def test_bad_input_keeps_the_connection(shared_server: ServerProcess, bad: bytes) -> None:
    with shared_server.connect() as sock:
        error, ok = exchange(sock, bad + b"\r\nput 3000000 1\r\nget 3000000\r\n", 3)[:2]
    assert error.startswith(b"Error: ")
    assert b"\x1b" not in error
    assert ok in (b"OK", b"Key already exists")


def test_too_long_request_closes_only_that_connection(shared_server: ServerProcess) -> None:
    with shared_server.connect() as other, shared_server.connect() as noisy:
        noisy.sendall(b"put 1 " + b"1" * 5000 + b"\n")
        assert read_to_eof(noisy) == b"Error: request too long\n"
        assert exchange(other, b"get 4000000\n", 1) == [b"Key not found"]


def test_idle_and_half_sent_clients_do_not_delay_others(shared_server: ServerProcess) -> None:
    with shared_server.connect() as idle, shared_server.connect() as half, \
            shared_server.connect(timeout=5) as busy:
        half.sendall(b"put 5000000 ")
        for i in range(50):
            assert exchange(busy, b"put %d 1\nget %d\n" % (5000001 + i, 5000001 + i), 2) == [b"OK", b"1"]
        half.sendall(b"9\n")
        assert exchange(half, b"get 5000000\n", 2) == [b"OK", b"9"]
        assert exchange(idle, b"get 5000000\n", 1) == [b"9"]


def test_half_closed_client_gets_its_replies(shared_server: ServerProcess) -> None:
    with shared_server.connect() as sock:
        sock.sendall(b"put 6000000 1\nget 6000000\nget 6000001")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"OK\n1\nKey not found\n"


def test_bye_closes_and_skips_what_follows(shared_server: ServerProcess) -> None:
    with shared_server.connect() as sock:
        sock.sendall(b"Bye\nput 7000000 1\n")
        assert read_to_eof(sock) == b"Goodbye\n"
    with shared_server.connect() as sock:
        assert exchange(sock, b"get 7000000\n", 1) == [b"Key not found"]


def test_2000_simultaneous_connections(shared_server: ServerProcess) -> None:
    n = 2000
    sockets = []
    try:
        for _ in range(n):
            sockets.append(shared_server.connect(timeout=30))
        for i, s in enumerate(sockets):
            s.sendall(b"put %d %d\n" % (8_000_000 + i, i))
        for s in sockets:
            assert exchange(s, b"", 1) == [b"OK"]
        assert exchange(sockets[0], b"get %d\n" % (8_000_000 + n - 1), 1) == [str(n - 1).encode()]
    finally:
        for s in sockets:
            s.close()


def test_connection_limit() -> None:
    server = start_server("--max-connections", "2")
    try:
        with server.connect() as a, server.connect() as b:
            assert exchange(a, b"get 1\n", 1) == [b"Key not found"]
            assert exchange(b, b"get 1\n", 1) == [b"Key not found"]
            with server.connect() as c:
                assert read_to_eof(c) == b"Error: too many connections\n"
        # The server learns of the two closes asynchronously: the slots free up soon after.
        for _ in range(100):
            with server.connect() as d:
                reply = exchange(d, b"get 1\n", 1)
            if reply != [b"Error: too many connections"]:
                break
        assert reply == [b"Key not found"]
    finally:
        server.stop()


def test_server_raises_a_low_open_file_limit() -> None:
    # Started with room for only 200 descriptors, the server must lift its
    # own soft limit to serve --max-connections clients.
    def lowLimit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    server = start_server("--max-connections", "400", preexec_fn=lowLimit)
    sockets = []
    try:
        for i in range(300):
            sockets.append(server.connect())
            sockets[-1].sendall(b"put %d 1\n" % i)
        assert all(exchange(s, b"", 1) == [b"OK"] for s in sockets)
    finally:
        for s in sockets:
            s.close()
        server.stop()


def test_idle_timeout_closes_idle_clients() -> None:
    server = start_server("--idle-timeout", "0.5")
    try:
        with server.connect() as sock:
            assert read_to_eof(sock) == b"Error: idle timeout\n"
    finally:
        server.stop()


def test_port_in_use_is_one_clear_line(kvserver: ServerProcess) -> None:
    result = subprocess.run([twistd(), "-n", "--pidfile=", "kvstore", "--port", str(kvserver.port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "kvstore: cannot listen on tcp:%d" % kvserver.port in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_sigterm_stops_cleanly(kvserver: ServerProcess) -> None:
    with kvserver.connect() as sock:
        assert exchange(sock, b"put 1 1\n", 1) == [b"OK"]
    status = kvserver.stop(signal.SIGTERM)
    assert status in (0, -signal.SIGTERM)
    assert "Traceback" not in kvserver.log_text()


def test_twist_runs_the_plugin(tmp_path: Path) -> None:
    twist = str(Path(sys.executable).with_name("twist"))
    proc = subprocess.Popen([twist, "--log-format", "text", "kvstore", "--port", "tcp:0:interface=127.0.0.1"], cwd=tmp_path,
                            stdout=open(tmp_path / "log", "wb"), stderr=subprocess.STDOUT)
    server = ServerProcess(proc, tmp_path / "log")
    try:
        server.wait_listening()
        with server.connect() as sock:
            assert exchange(sock, b"put 1 2\nget 1\n", 2) == [b"OK", b"2"]
    finally:
        server.stop()


def test_unix_socket_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "kv.sock"
    server = start_server(port=f"unix:{path}")
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            assert exchange(sock, b"put 1 2\nget 1\n", 2) == [b"OK", b"2"]
    finally:
        server.stop()


def _self_signed(tmp_path: Path) -> Path:
    """A throwaway certificate and key for localhost, in one PEM file."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    pem = tmp_path / "server.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    return pem


def test_tls_endpoint(tmp_path: Path) -> None:
    pytest.importorskip("OpenSSL", reason="ssl: endpoints need the tls extra")
    pem = _self_signed(tmp_path)
    server = start_server(port=f"ssl:0:interface=127.0.0.1:privateKey={pem}")
    try:
        context = ssl.create_default_context(cafile=str(pem))
        context.check_hostname = False
        with context.wrap_socket(server.connect(), server_hostname="localhost") as sock:
            assert exchange(sock, b"put 1 2\nget 1\n", 2) == [b"OK", b"2"]
    finally:
        server.stop()
