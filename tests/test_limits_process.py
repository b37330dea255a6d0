"""Integration: --max-keys and --password-file on a real server, over a real socket."""

from __future__ import annotations

from serverproc import exchange, start_server


def test_max_keys_refuses_new_keys_only() -> None:
    server = start_server("--max-keys", "2")
    try:
        with server.connect() as sock:
            assert exchange(sock, b"put 1 1\nput 2 2\nput 3 3\nput 1 9\ndel 1\nput 3 3\nget 3\n", 7) == (
                b"OK\nOK\nError: store is full\nKey already exists\nOK\nOK\n3\n"
            )
    finally:
        server.stop()


def test_a_password_file_locks_every_connection_until_auth(tmp_path) -> None:
    password = tmp_path / "password"
    password.write_bytes(b"s3cret\n")
    server = start_server("--password-file", str(password))
    try:
        with server.connect() as first, server.connect() as second:
            assert exchange(first, b"get 1\nauth nope\nauth s3cret\nput 1 2\n", 4) == (
                b"Error: authentication required\nError: invalid password\nOK\nOK\n"
            )
            assert exchange(second, b"get 1\n", 1) == b"Error: authentication required\n", "each connection on its own"
        assert "s3cret" not in server.log_text()
    finally:
        server.stop()
