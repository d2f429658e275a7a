"""Alert sinks against local servers that check the request shape the real services expect:
the Telegram Bot API, PagerDuty Events v2, a JSON webhook, and SMTP (aiosmtpd)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from edgeproxy.cli import main as cli_main
from edgeproxy.devtools.edgeproc import free_port
from edgeproxy.control.monitor import (
    Alert,
    AlertDispatcher,
    PagerDutySink,
    SmtpSink,
    TelegramSink,
    WebhookSink,
)

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)
BOT_TOKEN = "123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11"
ROUTING_KEY = "R0123456789abcdef0123456789abcde"

Check = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]


class FakeApi:
    """A local HTTP server: ``check(path, json_body) -> (status, json answer)``; records every call."""

    def __init__(self, check: Check) -> None:
        self.check = check
        self.calls: list[tuple[str, dict[str, Any]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw) if self.headers.get("Content-Type", "").startswith("application/json") else {}
                except ValueError:
                    body = {}
                fake.calls.append((self.path, body))
                status, answer = fake.check(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FakeApi":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def telegram_check(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """What api.telegram.org accepts for sendMessage."""
    if path != f"/bot{BOT_TOKEN}/sendMessage":
        return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
    if body.get("chat_id") != "-1001234567890" or not isinstance(body.get("text"), str) or not body["text"]:
        return 400, {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}
    if len(body["text"]) > 4096:
        return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message is too long"}
    return 200, {"ok": True, "result": {"message_id": 1, "chat": {"id": -1001234567890}, "text": body["text"]}}


def pagerduty_check(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The Events API v2 rules for trigger and resolve."""
    errors: list[str] = []
    if path != "/v2/enqueue":
        return 404, {"status": "not found"}
    if body.get("routing_key") != ROUTING_KEY:
        errors.append("invalid routing_key")
    action = body.get("event_action")
    if action not in ("trigger", "acknowledge", "resolve"):
        errors.append("event_action is invalid")
    if not isinstance(body.get("dedup_key"), str) or not 0 < len(body["dedup_key"]) <= 255:
        errors.append("dedup_key required for resolve and kept stable for trigger")
    if action == "trigger":
        payload = body.get("payload") or {}
        if not payload.get("summary") or len(payload["summary"]) > 1024:
            errors.append("payload.summary required (<= 1024 chars)")
        if not payload.get("source"):
            errors.append("payload.source required")
        if payload.get("severity") not in ("critical", "error", "warning", "info"):
            errors.append("payload.severity invalid")
    if errors:
        return 400, {"status": "invalid event", "message": "Event object is invalid", "errors": errors}
    return 202, {"status": "success", "message": "Event processed", "dedup_key": body["dedup_key"]}


def alert(action: str = "trigger", key: str = "probe:cdn.shop.example") -> Alert:
    return Alert(key, "probe_failing", action, "critical", "cdn.shop.example: probe failing: event: relay answered 401",
                 {"hostname": "cdn.shop.example"}, T0)


@pytest.fixture
def token_files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "bot-token").write_text(BOT_TOKEN + "\n")
    (tmp_path / "pd-key").write_text(ROUTING_KEY + "\n")
    return {"telegram": str(tmp_path / "bot-token"), "pagerduty": str(tmp_path / "pd-key")}


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd API
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def test_telegram_sink_sends_what_the_bot_api_accepts(token_files: dict[str, str]) -> None:
    with FakeApi(telegram_check) as api:
        sink = TelegramSink("-1001234567890", token_files["telegram"], api=api.url)
        failures = asyncio.run(AlertDispatcher([sink], retries=1).dispatch([alert(), alert("resolve")]))
        assert failures == {"telegram": []}
        (path, first), (_, second) = api.calls
        assert first["text"].startswith("[edgeproxy CRITICAL] cdn.shop.example: probe failing")
        assert second["text"].startswith("[edgeproxy RESOLVED]")
        # A wrong chat is refused by the API ({"ok": false}): retried, then reported, never raised.
        wrong = TelegramSink("42", token_files["telegram"], api=api.url)
        failures = asyncio.run(AlertDispatcher([wrong], retries=2, retry_delay=0.01).dispatch([alert()]))
        assert len(failures["telegram"]) == 1 and "chat not found" in failures["telegram"][0]
        assert len(api.calls) == 4


def test_pagerduty_sink_triggers_and_resolves_by_dedup_key(token_files: dict[str, str]) -> None:
    with FakeApi(pagerduty_check) as api:
        sink = PagerDutySink(token_files["pagerduty"], url=f"{api.url}/v2/enqueue")
        failures = asyncio.run(AlertDispatcher([sink], retries=1).dispatch([alert(), alert("resolve")]))
        assert failures == {"pagerduty": []}
        (_, trigger), (_, resolve) = api.calls
        assert trigger["event_action"] == "trigger" and resolve["event_action"] == "resolve"
        assert trigger["dedup_key"] == resolve["dedup_key"] == "probe:cdn.shop.example"
        assert trigger["payload"]["severity"] == "critical" and trigger["payload"]["group"] == "probe_failing"
        assert "payload" not in resolve


def test_smtp_sink_sends_an_email(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    sink = SmtpSink("127.0.0.1", port, "edge@example.test", ("oncall@example.test", "ops@example.test"))
    failures = asyncio.run(AlertDispatcher([sink], retries=1).dispatch([alert()]))
    assert failures == {"smtp": []}
    ((sender, recipients, content),) = inbox.messages
    assert sender == "edge@example.test" and recipients == ["oncall@example.test", "ops@example.test"]
    mail = message_from_bytes(content, policy=policy.default)
    assert mail["Subject"] == "[edgeproxy CRITICAL] cdn.shop.example: probe failing: event: relay answered 401"
    assert '"key": "probe:cdn.shop.example"' in mail.get_content()  # type: ignore[attr-defined]


def test_a_failing_sink_is_retried_and_never_blocks_the_others() -> None:
    def broken(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 500, {"error": "down"}

    def fine(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {}

    with FakeApi(broken) as bad, FakeApi(fine) as good:
        unreachable = WebhookSink(f"http://127.0.0.1:{free_port()}/hook", name="unreachable")
        sinks = [WebhookSink(f"{bad.url}/hook", name="bad"), WebhookSink(f"{good.url}/hook", name="good"), unreachable]
        deliveries: list[tuple[str, bool]] = []
        dispatcher = AlertDispatcher(sinks, retries=3, retry_delay=0.01,
                                     on_delivery=lambda name, ok: deliveries.append((name, ok)))
        failures = asyncio.run(dispatcher.dispatch([alert()]))
        assert failures["good"] == [] and len(failures["bad"]) == 1 and len(failures["unreachable"]) == 1
        assert len(bad.calls) == 3  # retried
        assert len(good.calls) == 1
        assert good.calls[0][1]["key"] == "probe:cdn.shop.example" and good.calls[0][1]["action"] == "trigger"
        assert sorted(deliveries) == [("bad", False), ("good", True), ("unreachable", False)]


def test_alert_test_command_reaches_every_sink(tmp_path: Path, token_files: dict[str, str],
                                               smtp: tuple[Inbox, int], capsys: pytest.CaptureFixture[str]) -> None:
    inbox, smtp_port = smtp
    hook_calls: list[dict[str, Any]] = []

    def hook(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        hook_calls.append(body)
        return 204 if path == "/hook" else 404, {}

    with FakeApi(hook) as webhook, FakeApi(telegram_check) as telegram, FakeApi(pagerduty_check) as pagerduty:
        config = tmp_path / "edgeproxy.toml"
        config.write_text(f"""
[alerts]
retries = 1
webhook_url = "{webhook.url}/hook"
telegram_chat_id = "-1001234567890"
telegram_token_file = "{token_files['telegram']}"
telegram_api = "{telegram.url}"
pagerduty_routing_key_file = "{token_files['pagerduty']}"
pagerduty_url = "{pagerduty.url}/v2/enqueue"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
smtp_from = "edge@example.test"
smtp_to = ["oncall@example.test"]
""")
        assert cli_main(["--config", str(config), "alert", "test"]) == 0
        out = capsys.readouterr().out
        assert out.split() == ["ok", "webhook", "ok", "telegram", "ok", "pagerduty", "ok", "smtp"]
        assert [c["kind"] for c in hook_calls] == ["test"]
        assert len(telegram.calls) == 1 and "test alert" in telegram.calls[0][1]["text"]
        # PagerDuty: the test incident is resolved at once, so nobody is left with an open page.
        assert [c[1]["event_action"] for c in pagerduty.calls] == ["trigger", "resolve"]
        assert len(inbox.messages) == 1

        # A broken sink makes the command fail (and say which).
        Path(token_files["telegram"]).write_text("999:wrong\n")
        assert cli_main(["--config", str(config), "alert", "test"]) == 1
        assert "FAIL  telegram" in capsys.readouterr().out


def test_alert_test_without_sinks_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "empty.toml"
    config.write_text("")
    assert cli_main(["--config", str(config), "alert", "test"]) == 1
    assert "no alert sinks configured" in capsys.readouterr().err
