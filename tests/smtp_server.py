"""A real SMTP server on loopback for the tests (aiosmtpd), recording what it receives."""

from __future__ import annotations

import email
import email.policy
import socket
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket() as s:  # aiosmtpd cannot bind port 0 (see ../shared/notes/ssh-and-smtp.md)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Inbox:
    messages: list = field(default_factory=list)
    logins: list = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        self.messages.append({"to": sorted(envelope.rcpt_tos), "subject": str(msg["Subject"]),
                              "message_id": str(msg["Message-ID"]),
                              "body": body.get_content() if body is not None else "",
                              "attachments": [(a.get_filename(), a.get_content_type(), a.get_content())
                                              for a in msg.iter_attachments()]})
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword):
            self.logins.append((auth_data.login.decode(), auth_data.password.decode()))
            return AuthResult(success=auth_data.password == b"s3cret-pw")
        return AuthResult(success=False)


class SMTPServer:
    def __init__(self, port: int | None = None):
        self.inbox = Inbox()
        self.port = port or free_port()
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port,
                                     authenticator=self.inbox.authenticate, auth_require_tls=False)

    def start(self) -> SMTPServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()
