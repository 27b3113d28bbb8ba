"""The token book re-reads ``tokens.json`` only when the file changed, and still sees every
change another process (the CLI) makes: a token created there verifies here at once, and a
revoked one stops verifying at once."""

from __future__ import annotations

from pathlib import Path

from dockyard.api.auth import TokenBook


def test_a_second_book_on_the_same_file_sees_creates_and_revokes_at_once(
    tmp_path: Path,
) -> None:
    server, cli = TokenBook(tmp_path / "tokens.json"), TokenBook(tmp_path / "tokens.json")
    assert server.verify("dy_00000000_" + "a" * 43) is None  # no file yet

    record, token = cli.create("ci", ["read"])
    found = server.verify(token)
    assert found is not None and found.id == record.id
    seen = server._seen
    assert server.verify(token) == found
    assert server._seen is seen  # unchanged file: the records read before, not decoded again

    _, other_token = cli.create("ops", ["deploy"])
    assert server.verify(other_token) is not None

    cli.revoke(record.id)
    assert server.verify(token) is None
    assert server.verify(other_token) is not None

    (tmp_path / "tokens.json").unlink()
    assert server.verify(other_token) is None
