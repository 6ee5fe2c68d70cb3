"""Requests aiohttp's HTTP parser refuses never echo a byte of the request, in the answer or in any log line.

Against a real `ztmw serve` process (audit on, JSON lines on stdout, aiohttp's logger on stderr), once with the
default C parser and once with the pure-Python one (AIOHTTP_NO_EXTENSIONS=1), raw-socket requests carry a
random marker token beside whatever the parser refuses: a control byte in Authorization or DPoP, an obs-fold,
a bad header name, an oversize header or request line, too many headers, a bad method or version, broken
chunked framing, a bad request pipelined after a good one. No eight consecutive characters of the marker may
appear in the response bytes or in anything the process wrote, and the status is the 4xx that fits, never 5xx.

In-process tests cover the pieces: the status mapping, `RejectionLogFilter` (what `ztmw.setup` installs for
apps that start aiohttp themselves, and what it cannot fix), `ParserSafeAppRunner` and `ztmw.run_app`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestPayloadError

import ztmw
from ztmw.parser_rejection import (
    REJECTION_LOG_FILTER,
    ParserSafeAppRunner,
    ParserSafeRequestHandler,
    RejectionLogFilter,
    carries_request_bytes,
    rejection_status,
)
from ztmw.testing import DevIssuer
from ztmw.testing.http import free_port

from .command import HELLO_RULE, ROOT, issuer_table
from .command import ztmw as ztmw_cli
from .raw_requests import leaked, new_marker, raw_exchange

PARSERS = {"c-parser": {}, "python-parser": {"AIOHTTP_NO_EXTENSIONS": "1"}}
MAX_FIELD_SIZE = 32768  # what `ztmw serve` gives aiohttp; its max_line_size stays aiohttp's 8190
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


# -- a real `ztmw serve` --------------------------------------------------------------------------------------


@dataclass
class Served:
    port: int
    output_file: Path
    process: subprocess.Popen[bytes]

    def output(self) -> bytes:
        return self.output_file.read_bytes()

    def exchange(self, *parts: bytes) -> bytes:
        """Send `parts` on one connection (each after the previous one's response, the last read to EOF)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            received = b""
            for part in parts[:-1]:
                sock.sendall(part)
                received += read_one_response(sock)
            sock.sendall(parts[-1])
            while chunk := sock.recv(65536):
                received += chunk
            return received

    def settle(self) -> None:
        """A request ztmw decides, then wait for its audit line: the process wrote everything about earlier
        requests before it (one event loop, in order), and the capture is shown to be live."""
        before = self.output().count(b'"ztmw.decision"')
        reply = self.exchange(b"GET /hello/settle HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
        assert STATUS.findall(reply) == [b"401"], reply[:200]
        deadline = time.monotonic() + 60
        while self.output().count(b'"ztmw.decision"') <= before:
            assert time.monotonic() < deadline, "the audit line of the settling request never appeared"
            assert self.process.poll() is None, self.output()[-2000:]
            time.sleep(0.02)


def read_one_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a full response: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def write_config(tmp: Path) -> Path:
    key = tmp / "issuer-key.json"
    ztmw_cli("token", "keygen", "--alg", "ES256", "--out", str(key), check=True)
    jwks = tmp / "jwks.json"
    jwks.write_text(ztmw_cli("token", "jwks", "--key", str(key), check=True).stdout, encoding="utf-8")
    config = tmp / "ztmw.toml"
    config.write_text(textwrap.dedent("""
        [resource]
        identifier = "https://api.example.com"
        public_origin = "http://127.0.0.1"

        [verifiers]
        enabled = ["bearer", "dpop"]

        {issuers}
        {hello}
        [[rules]]
        id = "upload"
        path = "/upload"
        methods = ["POST"]
        public = true
        """).format(issuers=issuer_table(jwks), hello=HELLO_RULE), encoding="utf-8")
    return config


@pytest.fixture(scope="module", params=sorted(PARSERS))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(request.param)
    config = write_config(tmp)
    port = free_port()
    output_file = tmp / "output.log"
    env = {k: v for k, v in os.environ.items() if k != "AIOHTTP_NO_EXTENSIONS"}
    env.update(PYTHONUNBUFFERED="1", **PARSERS[request.param])
    with output_file.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "ztmw", "serve", "tests.factories:create_upload_app", "--config", str(config),
             "--port", str(port)], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = Served(port, output_file, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not start: {server.output()!r}") from None
                time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def test_the_python_parser_is_the_one_aiohttp_uses_without_extensions() -> None:
    probe = "import aiohttp.http_parser as p; print(p.HttpRequestParser is p.HttpRequestParserPy)"
    env = {**os.environ, **PARSERS["python-parser"]}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


# -- every rejection, against `ztmw serve` -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A request (one or more sends on one connection) with `{M}` where the marker goes, and the statuses of
    its responses in order; `python_statuses`, when given, is another answer the pure-Python parser may give."""

    parts: tuple[bytes, ...]
    statuses: tuple[int, ...]
    python_statuses: tuple[int, ...] | None = None

    def accepted(self, parser: str) -> list[list[int]]:
        extra = [list(self.python_statuses)] if parser == "python-parser" and self.python_statuses else []
        return [list(self.statuses), *extra]


GET = b"GET /hello/x HTTP/1.1\r\nHost: api.example.com\r\n"
CHUNKED = b"POST /upload HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer {M}\r\n\r\n"

CASES = {
    "obs-fold continuation of Authorization": Case((GET + b"Authorization: Bearer\r\n {M}\r\n\r\n",), (400,)),
    "obs-fold continuation of DPoP": Case((GET + b"Authorization: DPoP x\r\nDPoP: x\r\n\t{M}\r\n\r\n",), (400,)),
    "control byte in a header name": Case((GET + b"Author\x01ization: Bearer {M}\r\n\r\n",), (400,)),
    "space before the colon": Case((GET + b"Authorization : Bearer {M}\r\n\r\n",), (400,)),
    "marker in a bad header name": Case((GET + b"X-{M}\x7f: 1\r\nAuthorization: Bearer {M}\r\n\r\n",), (400,)),
    # 32768 is ztmw serve's max_field_size: the line is over it
    # (the Python parser checks a line still arriving against max_line_size: 414 if the read ends inside it)
    "Authorization line over max_field_size": Case(
        (GET + b"Authorization: Bearer {M}" + b"a" * 40000 + b"\r\n\r\n",), (431,), (414,)),
    "DPoP line over max_field_size": Case((GET + b"DPoP: {M}" + b"a" * 40000 + b"\r\n\r\n",), (431,), (414,)),
    "request line over max_line_size": Case((b"GET /hello/{M}" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n"
                                             b"Authorization: Bearer {M}\r\n\r\n",), (414,)),
    "too many header lines": Case((GET + b"".join(b"X-%d: {M}\r\n" % i for i in range(200))
                                   + b"Authorization: Bearer {M}\r\n\r\n",), (431,)),
    "invalid method": Case((b"G\x01T /hello/{M} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {M}\r\n\r\n",), (400,)),
    "invalid HTTP version": Case((b"GET /hello/{M} HTXP/1.1\r\nHost: a\r\nAuthorization: Bearer {M}\r\n\r\n",),
                                 (400,)),
    "invalid chunk size": Case((CHUNKED + b"z{M}\r\nabc\r\n0\r\n\r\n",), (400,)),
    "chunk longer than its size": Case((CHUNKED + b"3\r\nabc{M}\r\n0\r\n\r\n",), (400,)),
    # aiohttp drops a good request that shares a read with a bad one (the parser raises for the whole read)
    "bad request pipelined after a good one, one send": Case(
        (GET + b"\r\n" + GET + b"Authorization: Bearer {M}\x00x\r\n\r\n",), (400,)),
    "bad request pipelined after a good one, two sends": Case(
        (GET + b"Authorization: Bearer {M}\r\n\r\n", GET + b"Authorization: Bearer {M}\x00x\r\n\r\n"), (401, 400)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_a_parser_rejection_answers_a_fixed_4xx_and_logs_no_request_byte(served: Served, case: Case,
                                                                          request: pytest.FixtureRequest) -> None:
    marker = new_marker()
    reply = served.exchange(*(part.replace(b"{M}", marker.encode()) for part in case.parts))
    served.settle()
    assert [int(s) for s in STATUS.findall(reply)] in case.accepted(request.node.callspec.params["served"]), reply[:300]
    assert leaked(marker, reply) == [], reply[:300]
    assert leaked(marker, served.output()) == [], served.output()[-3000:]


CONTROL_BYTES = [*range(0x00, 0x09), *range(0x0a, 0x20), 0x7f]  # every C0 control but HTAB (RFC 9110 §5.5), DEL


@pytest.mark.parametrize("header", [b"Authorization: Bearer ", b"Authorization: DPoP ", b"DPoP: "])
@pytest.mark.parametrize("byte", CONTROL_BYTES, ids=[f"0x{b:02x}" for b in CONTROL_BYTES])
def test_a_control_byte_in_a_credential_is_refused_without_echo(served: Served, header: bytes, byte: int,
                                                               request: pytest.FixtureRequest) -> None:
    marker = new_marker()
    line = header + marker[:16].encode() + bytes([byte]) + marker[16:].encode()
    reply = served.exchange(GET + line + b"\r\n\r\n")
    served.settle()
    statuses = [int(s) for s in STATUS.findall(reply)]
    assert statuses == [400], reply[:300]  # refused by the parser (or by ztmw's own header check)
    assert leaked(marker, reply) == [], reply[:300]
    assert leaked(marker, served.output()) == [], served.output()[-3000:]


def test_a_handler_reading_a_body_whose_chunked_framing_breaks_gets_400(served: Served,
                                                                       request: pytest.FixtureRequest) -> None:
    if request.node.callspec.params["served"] == "c-parser":
        pytest.skip("aiohttp's C parser drops the body stream of a request whose framing breaks while a handler "
                    "reads it: the handler waits for the client to hang up, and nothing is sent")
    marker = new_marker()
    head = b"POST /upload HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"  # public
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(head + b"3\r\nabc\r\n")  # the handler starts reading...
        time.sleep(0.2)  # (were both sends one read, the parser would refuse it first: the same 400)
        sock.sendall(b"z" + marker.encode() + b"\r\n")  # ...and the next chunk size is not hex
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    served.settle()
    assert STATUS.findall(reply) == [b"400"], reply[:300]
    assert leaked(marker, reply) == [] and leaked(marker, served.output()) == [], served.output()[-3000:]


def test_the_server_logs_that_it_refused_a_request(served: Served) -> None:
    before = served.output().count(b"HTTP parser rejected a request from 127.0.0.1")
    served.exchange(GET + b"Authorization: Bearer \x00\r\n\r\n")
    served.settle()
    assert served.output().count(b"HTTP parser rejected a request from 127.0.0.1") == before + 1


# -- the pieces, in process ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "status"), [
    (LineTooLong(b"x", 32768), 431),
    (LineTooLong(b"x", 8190), 414),
    (LineTooLong(b"x"), 400),
    (BadHttpMessage("Too many headers received"), 431),
    (BadHttpMessage("Too many trailers received"), 431),
    (BadHttpMessage("Invalid header value char"), 400),
    (BadHttpMethod("G\x01T"), 400),
])
def test_rejection_status_fits_what_the_parser_refused(exc: Exception, status: int) -> None:
    assert rejection_status(exc, max_line_size=8190, max_field_size=32768) == status


def test_rejection_status_is_400_when_the_limits_cannot_tell_the_lines_apart() -> None:
    assert rejection_status(LineTooLong(b"x", 8190), max_line_size=8190, max_field_size=8190) == 400


def test_a_handler_failure_is_not_a_parser_rejection() -> None:
    assert not carries_request_bytes(ValueError("a handler's own bug"))
    try:
        try:
            raise BadHttpMessage("Invalid header value char: b'Bearer x\\x00'")
        except BadHttpMessage as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert carries_request_bytes(outer)


def record_with(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        return logging.getLogger("aiohttp.server").makeRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s", ("127.0.0.1",),
            sys.exc_info())


def test_the_log_filter_drops_the_quoted_line_and_keeps_what_happened() -> None:
    marker = new_marker()
    record = record_with(BadHttpMessage(f"Invalid header value char:\n\n  b'Authorization: Bearer {marker}\\x00'"))
    assert RejectionLogFilter().filter(record) is True
    text = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert leaked(marker, text.encode()) == []
    assert text == "ERROR Error handling request from 127.0.0.1: BadHttpMessage (request bytes withheld)"


def test_the_log_filter_leaves_other_records_alone() -> None:
    record = record_with(ValueError("a handler's own bug"))
    assert RejectionLogFilter().filter(record) is True
    assert "ValueError: a handler's own bug" in logging.Formatter().format(record)


class Collector(logging.Handler):
    """Every record of a logger, formatted with its traceback, as an operator's log file would have it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += self.format(record) + "\n"


@pytest.fixture
def server_log() -> Iterator[Collector]:
    logger = logging.getLogger("aiohttp.server")
    collector, level = Collector(), logger.level
    logger.addHandler(collector)
    logger.setLevel(logging.DEBUG)
    try:
        yield collector
    finally:
        logger.removeHandler(collector)
        logger.setLevel(level)


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


def plain_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/hello/{name}", hello)
    return app


async def serve_with(runner: web.AppRunner) -> int:
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return port


async def test_parser_safe_app_runner_answers_without_echo_and_logs_without_the_line(server_log: Collector) -> None:
    marker = new_marker()
    runner = ParserSafeAppRunner(plain_app(), access_log=None)
    port = await serve_with(runner)
    try:
        reply = await raw_exchange(port, GET + f"Authorization: Bearer {marker}\x00\r\n\r\n".encode())
    finally:
        await runner.cleanup()
    assert reply.startswith(b"HTTP/1.0 400 Bad Request\r\n") and reply.endswith(b"\r\n\r\n400 Bad Request\n")
    assert leaked(marker, reply) == [] and leaked(marker, server_log.text.encode()) == []
    assert "aiohttp.server WARNING HTTP parser rejected a request from 127.0.0.1: BadHttpMessage" in server_log.text


async def test_other_aiohttp_log_lines_about_a_rejection_lose_its_text(server_log: Collector) -> None:
    """aiohttp's start() logs "Unhandled exception" when it trips over a broken body after the answer."""
    marker = new_marker()
    server = web.Server(hello)
    handler = ParserSafeRequestHandler(server, loop=asyncio.get_running_loop())
    try:
        raise RequestPayloadError(f"400, message: z{marker}")
    except RequestPayloadError as exc:
        handler.log_exception("Unhandled exception", exc_info=exc)
    handler.log_exception("Error handling request from %s", "127.0.0.1", exc_info=ValueError("a handler's own"))
    assert leaked(marker, server_log.text.encode()) == []
    assert "ERROR Unhandled exception: RequestPayloadError (request bytes withheld)" in server_log.text
    assert "ValueError: a handler's own" in server_log.text  # anything else: aiohttp's record, traceback and all


async def test_parser_safe_app_runner_refuses_an_unknown_server_option_at_start_up() -> None:
    # aiohttp would warn and build its own (echoing) handler without the option
    runner = ParserSafeAppRunner(plain_app(), access_log=None, max_feild_size=1)
    with pytest.raises(TypeError, match="max_feild_size"):
        await runner.setup()
    await runner.cleanup()


async def test_setup_alone_keeps_the_line_out_of_aiohttp_logs_but_not_out_of_its_answer(
    server_log: Collector, issuer: DevIssuer
) -> None:
    """What an app gets from `ztmw.setup` with aiohttp's own runner: the README tells it to use ztmw.run_app
    (or ParserSafeAppRunner) for the answer. If aiohttp stops quoting the line, this test says so."""
    from .conftest import base_config

    logging.getLogger("aiohttp.server").removeFilter(REJECTION_LOG_FILTER)
    app = plain_app()
    ztmw.setup(app, base_config(issuer, rules=[{"id": "hello", "path": "/hello/{name}", "scopes": ["a"]}]))
    marker = new_marker()
    runner = web.AppRunner(app, access_log=None)
    port = await serve_with(runner)
    try:
        reply = await raw_exchange(port, GET + f"Authorization: Bearer {marker}\x00\r\n\r\n".encode())
    finally:
        await runner.cleanup()
    assert leaked(marker, server_log.text.encode()) == []
    assert "Error handling request from 127.0.0.1: BadHttpMessage (request bytes withheld)" in server_log.text
    assert leaked(marker, reply) != []  # aiohttp's body quotes the line: only the runner changes that


def test_run_app_serves_on_a_given_socket_and_shuts_down_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`ztmw.run_app` as an app's __main__ would call it: a socket it was handed, SIGTERM, cleanup hooks run."""
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import socket, sys
        from aiohttp import web
        import ztmw

        async def hello(request):
            return web.Response(text="hello")

        async def cleanup(app):
            print("cleaned up", flush=True)

        app = web.Application()
        app.router.add_get("/hello/{name}", hello)
        app.on_cleanup.append(cleanup)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        print("port", sock.getsockname()[1], flush=True)
        ztmw.run_app(app, sock=sock, print=None)
        print("returned", flush=True)
        """), encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        assert process.stdout is not None
        first = process.stdout.readline().split()
        assert first[0] == b"port", first
        port = int(first[1])
        marker = new_marker()
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                    sock.sendall(GET + f"Authorization: Bearer {marker}\x01\r\n\r\n".encode())
                    reply = b""
                    while chunk := sock.recv(65536):
                        reply += chunk
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        assert STATUS.findall(reply) == [b"400"] and leaked(marker, reply) == []
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert output.splitlines()[-2:] == [b"cleaned up", b"returned"], output
    assert leaked(marker, output) == []
