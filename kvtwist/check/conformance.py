"""
Conformance: does the server answer single clients as the protocol says?

Two profiles. ``basic`` checks only the rules any server of this protocol
must follow (those of the assignment that defined it): the sample session,
the four fixed replies and closing after Bye, pipelined replies in order,
and CRLF request endings; input the protocol says nothing about may get any
reply, as long as the connection keeps working.
``kvtwist`` adds the stricter rules of this project's protocol
specification (docs/protocol.md): case-insensitive verbs, tabs, the exact
64-bit integer syntax, ``Error: `` replies that never echo input, NUL and
blank requests, Bye ending the session, the request-size limit, and bare LF
reply endings.

Every script starts by deleting the keys it uses (accepting either reply),
so the store's previous contents do not matter.
"""

from __future__ import annotations

from kvtwist.check import workload
from kvtwist.check.report import CheckResult
from kvtwist.check.script import Exchange, Script, ask, error, oneOf, reply, runScript
from kvtwist.check.target import Target

OK = reply("OK")
EXISTS = reply("Key already exists")
NOT_FOUND = reply("Key not found")
GOODBYE = reply("Goodbye")
CLEARED = oneOf("OK", "Key not found")

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

def _clear(*keys: int, connection: int = 0) -> list[Exchange]:
    return [ask(f"del {key}", CLEARED, connection=connection) for key in keys]


def sampleSession() -> Script:
    """The protocol's sample session (as kvtwist's README shows it), request by request."""
    return Script(
        "sample session",
        "the protocol's sample session gets exactly the sample's replies, and Bye closes",
        (
            *_clear(1, 2, 5),
            ask("put 1 2", OK),
            ask("put 1 3", EXISTS),
            ask("put 2 3", OK),
            ask("get 1", reply("2")),
            ask("del 1", OK),
            ask("get 1", NOT_FOUND),
            ask("del 5", NOT_FOUND),
            ask("Bye", GOODBYE, closes=True),
        ),
    )


def pipelining(seed: int, count: int) -> Script:
    """
    ``count`` keys written, read, deleted and read again, all in one write.

    The check is named by the number of requests it really sends (5.25 per
    key), so that its name and its summary agree.
    """
    keys = workload.keys(seed, f"pipelining/{count}", count)
    order = workload.rng(seed, f"pipelining/order/{count}")
    values = {key: order.randrange(-(10**12), 10**12) for key in keys}
    shuffled = order.sample(keys, len(keys))
    requests: list[bytes] = []
    expect = []
    for line, wanted in (
        *((f"del {key}", CLEARED) for key in keys),
        *((f"put {key} {values[key]}", OK) for key in keys),
        *((f"get {key}", reply(str(values[key]))) for key in shuffled),
        *((f"put {key} 0", EXISTS) for key in keys[: count // 4]),
        *((f"del {key}", OK) for key in shuffled),
        *((f"get {key}", NOT_FOUND) for key in keys),
    ):
        requests.append(line.encode() + b"\n")
        expect.append(wanted)
    return Script(
        f"{len(requests)} pipelined requests",
        f"{len(requests)} requests on {count} keys, sent in one write, get their replies in request order",
        (Exchange(b"".join(requests), tuple(expect)),),
    )


def crlf(seed: int) -> Script:
    key, = workload.keys(seed, "crlf", 1)
    lines = [
        (f"del {key}", CLEARED),
        (f"put {key} 42", OK),
        (f"put {key} 43", EXISTS),
        (f"get {key}", reply("42")),
        (f"del {key}", OK),
        (f"get {key}", NOT_FOUND),
        ("Bye", GOODBYE),
    ]
    return Script(
        "CRLF requests",
        "requests ending in CR LF (as telnet sends them) work like LF ones",
        tuple(
            Exchange(line.encode() + b"\r\n", (wanted,), closes=line == "Bye") for line, wanted in lines
        ),
    )


def otherInput(seed: int) -> Script:
    """Input the protocol does not define: any reply, but the connection must go on."""
    key, other = workload.keys(seed, "other-input", 2)
    marker = "1234567"
    oddities = [
        b"hello world",
        b"put",
        b"put %d" % other,
        b"get",
        b"get x",
        b"put x y",
        b"del %d %d" % (other, other),
        b"\x1b[2J\xff\xfe",
    ]
    return Script(
        "undefined input",
        "unknown commands, missing arguments and non-numbers get some reply and the connection keeps working",
        (
            *_clear(key),
            ask(f"put {key} {marker}", OK),
            *(Exchange(oddity + b"\nget %d\n" % key, until=marker.encode()) for oddity in oddities),
            ask(f"del {key}", OK),
        ),
    )


def basicScripts(seed: int) -> list[Script]:
    return [sampleSession(), pipelining(seed, 200), crlf(seed), otherInput(seed)]


def caseInsensitive(seed: int) -> Script:
    key, = workload.keys(seed, "case", 1)
    return Script(
        "verbs in any case",
        "PUT, Get, dEl and BYE are the same commands as put, get, del and Bye",
        (
            *_clear(key),
            ask(f"PUT {key} 7", OK),
            ask(f"Get {key}", reply("7")),
            ask(f"gET {key}", reply("7")),
            ask(f"dEl {key}", OK),
            ask("BYE", GOODBYE, closes=True),
        ),
    )


def separators(seed: int) -> Script:
    key, = workload.keys(seed, "separators", 1)
    return Script(
        "spaces and tabs",
        "runs of spaces and tabs separate tokens",
        (
            *_clear(key),
            ask(f"put\t{key} \t 5", OK),
            ask(f"  get   {key}\t", reply("5")),
            ask(f"del\t\t{key}", OK),
        ),
    )


def integers(seed: int) -> Script:
    key, other = workload.keys(seed, "integers", 2)
    return Script(
        "64-bit integers",
        "signs, leading zeros and the full signed 64-bit range are accepted; replies are canonical",
        (
            *_clear(key, other, INT64_MIN),
            ask(f"put 000{key} -0005", OK),
            ask(f"get +{key}", reply("-5")),
            ask(f"put {key} 1", EXISTS),
            ask(f"put {other} {INT64_MAX}", OK),
            ask(f"get {other}", reply(str(INT64_MAX))),
            ask(f"put {INT64_MIN} +{INT64_MAX}", OK),
            ask(f"get -0{-INT64_MIN}", reply(str(INT64_MAX))),
            ask(f"put {INT64_MIN} {INT64_MIN}", EXISTS),
            *_clear(key, other, INT64_MIN),
        ),
    )


def badIntegers(seed: int) -> Script:
    key, = workload.keys(seed, "bad-integers", 1)
    bad = ["1_000", "1e3", "0x10", "1.0", "+", "-", "--1", "\u0661\u0662", "\uff11", str(INT64_MAX + 1), str(INT64_MIN - 1)]
    exchanges = list(_clear(key))
    for token in bad:
        exchanges.append(ask(f"put {key} {token}", error()))
        exchanges.append(ask(f"get {token}", error()))
    exchanges.append(ask(f"get {key}", NOT_FOUND))
    return Script(
        "malformed integers",
        "1_000, 1e3, 0x10, non-ASCII digits and values outside 64 bits get 'Error: ' and store nothing",
        tuple(exchanges),
    )


def errors(seed: int) -> Script:
    key, = workload.keys(seed, "errors", 1)
    secret = b"zqxv"
    return Script(
        "error replies",
        "unknown commands and wrong argument counts get 'Error: ' replies that do not echo the input",
        (
            *_clear(key),
            Exchange(b"frobnicate %s\n" % secret, (error(secret),)),
            Exchange(b"\x1b[2J%s 1 2\n" % secret, (error(secret),)),
            ask("put 1", error()),
            ask("get", error()),
            ask(f"get {key} {key}", error()),
            ask(f"del {key} 1", error()),
            ask("Bye now", error()),
            Exchange(b"put %s 1\n" % secret, (error(secret),)),
            ask(f"get {key}", NOT_FOUND),
        ),
    )


def terminators(seed: int) -> Script:
    key, = workload.keys(seed, "terminators", 1)
    return Script(
        "NUL and blank requests",
        "a NUL byte ends a request like LF does; blank requests get no reply",
        (
            *_clear(key),
            Exchange(b"put %d 9\x00get %d\x00" % (key, key), (OK, reply("9"))),
            Exchange(b"\n\r\n\n" + b"del %d\n" % key, (OK,)),
        ),
    )


def byeEndsSession(seed: int) -> Script:
    key, = workload.keys(seed, "bye", 1)
    return Script(
        "Bye ends the session",
        "requests after Bye in the same write are not executed, and the connection closes",
        (
            *_clear(key),
            Exchange(b"Bye\nput %d 1\n" % key, (GOODBYE,), closes=True, connection=1),
            ask(f"get {key}", NOT_FOUND),
        ),
    )


def tooLong(seed: int, maxRequest: int) -> Script:
    key, = workload.keys(seed, "too-long", 1)
    size = 2 * maxRequest
    return Script(
        "request too long",
        f"a {size}-byte request (twice --max-request) gets 'Error: request too long' and the connection closes",
        (Exchange(b"put %d " % key + b"1" * size, (reply("Error: request too long"),), closes=True),),
    )


def kvtwistScripts(seed: int, maxRequest: int) -> list[Script]:
    return [
        *basicScripts(seed),
        pipelining(seed, 5000),
        caseInsensitive(seed),
        separators(seed),
        integers(seed),
        badIntegers(seed),
        errors(seed),
        terminators(seed),
        byeEndsSession(seed),
        tooLong(seed, maxRequest),
    ]


async def checkConformance(target: Target) -> list[CheckResult]:
    settings = target.settings
    if target.strict:
        scripts = kvtwistScripts(settings.seed, settings.maxRequest)
    else:
        scripts = basicScripts(settings.seed)
    return [target.finished(await runScript(target, "conformance", script)) for script in scripts]
