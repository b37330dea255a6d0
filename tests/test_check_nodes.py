"""The nodes a run checks: how the command line names them, and how clients are spread over them."""

from __future__ import annotations

import pytest

from kvtwist.check.cli import parseSettings
from kvtwist.check.nodes import AddressError, Node, parseNode, parseNodes, parsePort
from kvtwist.check.target import Settings, Target


@pytest.mark.parametrize(
    "words, nodes",
    [
        (["127.0.0.1", "5000"], [("127.0.0.1", 5000)]),
        (["::1", "5000"], [("::1", 5000)]),
        (["localhost", "1"], [("localhost", 1)]),
        (["127.0.0.1:5000"], [("127.0.0.1", 5000)]),
        (["[::1]:5000"], [("::1", 5000)]),
        (["[fe80::1%eth0]:65535"], [("fe80::1%eth0", 65535)]),
        (["a:1", "b:2"], [("a", 1), ("b", 2)]),
        (["a:1", "a:1"], [("a", 1), ("a", 1)]),
        (["a:1", "[::1]:2", "c.example:3"], [("a", 1), ("::1", 2), ("c.example", 3)]),
    ],
)
def test_theFormsThatNameNodes(words: list[str], nodes: list[tuple[str, int]]) -> None:
    assert parseNodes(words) == tuple(Node(host, port) for host, port in nodes)


@pytest.mark.parametrize(
    "words, says",
    [
        ([], "no server given"),
        (["127.0.0.1"], "not HOST:PORT: '127.0.0.1'"),
        (["127.0.0.1", "http"], "not a TCP port number (1 to 65535): 'http'"),
        (["127.0.0.1", "0"], "'0'"),
        (["127.0.0.1", "65536"], "'65536'"),
        (["127.0.0.1", "٥٠٠٠"], "not a TCP port number"),
        (["a:1", "5000"], "not HOST:PORT: '5000'"),
        (["a:1", "b"], "not HOST:PORT: 'b'"),
        (["a:"], "not a TCP port number (1 to 65535): ''"),
        ([":5000"], "no host in ':5000'"),
        (["::1:5000"], "write an IPv6 address in brackets"),
        (["[::1]5000"], "not [ADDRESS]:PORT: '[::1]5000'"),
        (["[::1:5000"], "not [ADDRESS]:PORT"),
        (["[127.0.0.1]:5000"], "brackets are for IPv6 addresses only"),
        (["a:1", "b:2", "c:-3"], "'-3'"),
    ],
)
def test_wordsThatNameNoNodeSayWhyInOneLine(words: list[str], says: str) -> None:
    with pytest.raises(AddressError) as raised:
        parseNodes(words)
    message = str(raised.value)
    assert says in message
    assert "\n" not in message


def test_anAddressPrintsAsItIsWritten() -> None:
    for word in ("127.0.0.1:5000", "[::1]:5000", "localhost:7"):
        assert parseNode(word).address == word
    assert parsePort("00080") == 80


def test_theCommandLineTakesNodesBetweenOptions() -> None:
    settings, _ = parseSettings(["a:1", "--clients", "3", "[::1]:2", "--duration", "2.5"])
    assert settings.nodes == (Node("a", 1), Node("::1", 2))
    assert settings.clients == 3 and settings.duration == 2.5
    assert settings.shown()["nodes"] == ["a:1", "[::1]:2"]
    settings, _ = parseSettings(["::1", "5000"])
    assert settings.nodes == (Node("::1", 5000),)


def test_aBadAddressOnTheCommandLineIsStatusTwo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parseSettings(["a:1", "b:70000"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kvtwist-check: not a TCP port number (1 to 65535): '70000'") and err.count("\n") == 1


def test_clientsGoToTheNodesRoundRobin() -> None:
    nodes = (Node("a", 1), Node("b", 2), Node("c", 3))
    target = Target(None, Settings(nodes))
    assert [target.nodeOf(client) for client in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert target.address == "a:1"
    assert target.description == "a:1, b:2, c:3"
    single = Target(None, Settings((Node("::1", 5),)))
    assert {single.nodeOf(client) for client in range(5)} == {0}
    assert single.description == "[::1]:5"
