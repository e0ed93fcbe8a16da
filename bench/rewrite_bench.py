"""Rewrite benchmark: the corpus and the newsletter, beside pytracking and bare lexbor.

Run: /work/venv/bin/python bench/rewrite_bench.py [--quick]

Per message: our whole-message rewrite (prepare + render for one recipient, MIME decode and
quoted-printable encode included), render alone (the per-recipient cost), render with the
relay's ``Received:`` line worked out and put on top (what each copy costs in the relay, with
``smtp.add_received`` on), pytracking's
``adapt_html`` on the decoded HTML only (lxml parse + serialize, with opens and clicks), and a
bare lexbor parse + serialize of the same HTML. Times are the best of several rounds.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser

from relay.rewrite.headers import prepend_headers
from relay.rewrite.splice import RewriteOptions, prepare
from relay.smtp import trace
from relay.tracking.tokens import Keyring

SHARED = Path(__file__).resolve().parents[2] / "shared"  # beside the project's root
OPTIONS = RewriteOptions(opens=True, clicks=True, base_url="https://track.shop.example")
KEYS = Keyring({"k1": b"k" * 32}, "k1")
EMAIL_ID = "email_01890a5d-ac96-774b-bcce-b302099a8057"
RCPT = "reader@example.org"


def wrap(html: str) -> bytes:
    """A multipart/alternative message with the HTML as UTF-8 quoted-printable."""
    body = binascii.b2a_qp(html.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
    text = base64.encodebytes(b"plain text version").replace(b"\n", b"\r\n")
    return b"\r\n".join(
        [
            b"From: Shop <news@shop.example>",
            b"To: reader@example.org",
            b"Subject: benchmark",
            b"MIME-Version: 1.0",
            b'Content-Type: multipart/alternative; boundary="b"',
            b"",
            b"--b",
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: base64",
            b"",
            text,
            b"--b",
            b"Content-Type: text/html; charset=utf-8",
            b"Content-Transfer-Encoding: quoted-printable",
            b"",
            body,
            b"--b--",
            b"",
        ]
    )


def received_on_top(message: bytes) -> bytes:
    """As the pipeline does for each copy (one trace.Received per message)."""
    received = trace.Received(helo="app.shop.example", address="192.0.2.1",
                              by="relay.shop.example", protocol="ESMTPS", email_id=EMAIL_ID,
                              when=time.time())
    return prepend_headers(message, [received.field(RCPT)])


def html_of(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in message.walk():
        if part.get_content_type() == "text/html":
            return part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8")
    raise ValueError("no text/html part")


def best(fn: Callable[[], object], rounds: int, number: int) -> float:
    """Best per-call time in seconds over ``rounds`` rounds of ``number`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return min(times)


def pytracking_adapter() -> Callable[[str], object] | None:
    try:
        import pytracking
        from pytracking.html import adapt_html
    except ImportError:  # pytracking's HTML support needs lxml
        return None
    configuration = pytracking.Configuration(
        base_open_tracking_url="https://track.shop.example/o/",
        base_click_tracking_url="https://track.shop.example/c/",
    )
    return lambda html: adapt_html(html, {"email_id": EMAIL_ID}, configuration=configuration)


def runs(fn: Callable[[], object]) -> bool:
    """Whether ``fn`` works at all (pytracking fails on documents without a <body>)."""
    try:
        fn()
    except Exception:
        return False
    return True


def main() -> None:
    quick = "--quick" in sys.argv
    rounds, number = (3, 20) if quick else (7, 100)
    messages = [("newsletter.eml", (SHARED / "bench" / "newsletter.eml").read_bytes())]
    for path in sorted((SHARED / "corpus" / "html").glob("*.html")):
        messages.append((path.name, wrap(path.read_text("utf-8"))))
    adapt = pytracking_adapter()
    header = (
        f"{'message':<44}{'KB':>6}{'ours µs':>9}{'render':>8}{'+rcvd':>7}{'MB/s':>7}"
        f"{'pytrack':>9}{'lexbor':>8}{'x pyt':>7}{'/lexb':>7}"
    )
    print(header)
    print("-" * len(header))
    ratios_pyt, ratios_lexbor = [], []
    for name, raw in messages:
        html = html_of(raw)
        prepared = prepare(raw, OPTIONS)
        assert prepared.will_change, (name, prepared.reason)
        ours = best(
            lambda raw=raw: prepare(raw, OPTIONS).render(EMAIL_ID, RCPT, KEYS), rounds, number
        )
        render = best(lambda p=prepared: p.render(EMAIL_ID, RCPT, KEYS), rounds, number)
        traced = best(lambda p=prepared: received_on_top(p.render(EMAIL_ID, RCPT, KEYS)),
                      rounds, number)
        lexbor = best(lambda html=html: LexborHTMLParser(html).html, rounds, number)
        pyt = 0.0
        if adapt and runs(lambda html=html: adapt(html)):
            pyt = best(lambda html=html: adapt(html), rounds, max(1, number // 5))
        ratios_lexbor.append(ours / lexbor)
        if pyt:
            ratios_pyt.append(pyt / ours)
        print(
            f"{name[:43]:<44}{len(raw) / 1024:>6.1f}{ours * 1e6:>9.0f}{render * 1e6:>8.0f}"
            f"{traced * 1e6:>7.0f}"
            f"{len(raw) / ours / 1e6:>7.1f}{pyt * 1e6:>9.0f}{lexbor * 1e6:>8.0f}"
            f"{(pyt / ours if pyt else float('nan')):>7.1f}{ours / lexbor:>7.2f}"
        )
    print("-" * len(header))
    if ratios_pyt:
        print(f"median speed-up over pytracking adapt_html: {statistics.median(ratios_pyt):.1f}x")
    else:
        print("pytracking adapt_html unavailable (needs lxml)")
    print(f"median ours / lexbor parse+serialize: {statistics.median(ratios_lexbor):.2f}")


if __name__ == "__main__":
    main()
