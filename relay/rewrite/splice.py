"""The rewrite: open pixel and signed click links spliced into the original message.

``prepare`` does everything that does not depend on the recipient once per message: split the
MIME tree, decode each trackable HTML part, find links and the pixel's place, and encode the
result as quoted-printable pieces with a gap for each token. ``Prepared.render`` then only signs
tokens and joins bytes. Every byte outside the edited HTML bodies and their two headers is the
input's own (README, "How a message travels").
"""

from __future__ import annotations

import bisect
import functools
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import AnyStr, Generic, overload

from relay.errors import DecodeError
from relay.rewrite import markup, mime, urls
from relay.rewrite.dkim import DkimSigner, signature_tags
from relay.rewrite.headers import HeaderBlock
from relay.tracking.tokens import Keyring, RecipientSigner

OPT_OUT_ATTRIBUTES = (
    "data-alidm-traceoff",
    "data-smtpd-no-track",
    "data-pm-no-track",
    "ses:no-track",
)
SIGNED_PART = "inside multipart/signed: a change would break its signature"
# Why a link was left alone, beside the reasons relay/rewrite/urls.py gives for the URL itself.
OPT_OUT = "opt_out"
TRACKING_HOST = "tracking_host"
EXCLUDED_HOST = "excluded_host"
LINK_REASONS = (urls.EMPTY, urls.FRAGMENT, urls.RELATIVE, urls.NOT_HTTP, urls.PLACEHOLDER,
                urls.MALFORMED, urls.TOO_LONG, OPT_OUT, TRACKING_HOST, EXCLUDED_HOST)
PIXEL_STYLE = "display:block;border:0;height:1px;width:1px;margin:0;padding:0;overflow:hidden"
_PIXEL_TAIL = f'" width="1" height="1" alt="" border="0" style="{PIXEL_STYLE}" />'
_OPEN = -1  # token index of the open pixel in a rendering's token list

TRACKING_BASE = re.compile(  # what a tracking base URL (http.public_url) may look like
    r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:/[\w.~/-]*)?"
)
_LONE_CR = re.compile(r"\r(?!\n)")


@dataclass(frozen=True)
class RewriteOptions:
    opens: bool
    clicks: bool
    base_url: str  # tracking base, no trailing slash
    excluded_hosts: frozenset[str] = frozenset()  # never rewritten, subdomains included
    dkim: DkimSigner | None = None  # key for the sender's domain, to re-sign after the change


@dataclass(frozen=True, slots=True)
class LinkResult:
    href: str  # the attribute value as written
    url: str | None  # what the click token carries, when rewritten: the URL as written
    reason: str = ""  # why it was left alone, for people
    code: str = ""  # why it was left alone: a code from relay/rewrite/urls.py or this module

    @property
    def rewritten(self) -> bool:
        return self.url is not None


class Column(Generic[AnyStr]):
    """Strings (or byte strings) kept as one, with the offset where each ends.

    What a prepared message keeps for as long as its copies go out has as many pieces as it
    has links (100,000 in bench/fanout_bench.py): a list or tuple of them has the cyclic garbage
    collector visit every piece on each pass that looks at it, a cache miss each (80-150 ms
    after each message was prepared, and on every full pass while it was sent, the event loop
    waiting). One string and an ``array`` of offsets are no containers to the collector.
    """

    __slots__ = ("text", "_ends")

    def __init__(self, items: Iterable[AnyStr], empty: AnyStr) -> None:
        pieces = list(items)
        self.text: AnyStr = empty.join(pieces)
        self._ends = array("q", [0])
        end = 0
        for piece in pieces:
            end += len(piece)
            self._ends.append(end)

    @classmethod
    def joined(cls, columns: Sequence[Column[AnyStr]], empty: AnyStr) -> Column[AnyStr]:
        joined = cls((), empty)
        joined.text = empty.join(column.text for column in columns)
        for column in columns:
            offset = joined._ends[-1]
            joined._ends.extend(end + offset for end in column._ends[1:])
        return joined

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, index: int) -> AnyStr:
        return self.text[self._ends[index] : self._ends[index + 1]]

    def span(self, index: int) -> tuple[int, int]:
        """Where piece ``index`` is in :attr:`text`."""
        return self._ends[index], self._ends[index + 1]


class Links(Sequence[LinkResult]):
    """Links, each rewritten or left alone with its reason, in the order of the message.

    Kept as columns (:class:`Column`) rather than one object per link, and made a
    :class:`LinkResult` only when one is read: a newsletter's 100,000 links stay in memory while
    its copies go out, and as objects every garbage collection that looked at them walked them
    all. The links left alone are indexed, so what is told about them (:meth:`untracked`)
    costs as many steps as it tells.
    """

    __slots__ = ("_hrefs", "_urls", "_left", "_codes", "_reasons")

    def __init__(self, links: Iterable[LinkResult] = ()) -> None:
        every = list(links)
        left = [index for index, link in enumerate(every) if link.url is None]
        self._hrefs = Column((link.href for link in every), "")
        self._urls = Column((link.url or "" for link in every), "")
        self._left = array("q", left)
        self._codes = Column((every[index].code for index in left), "")
        self._reasons = Column((every[index].reason for index in left), "")

    @classmethod
    def joined(cls, groups: Sequence[Links]) -> Links:
        """The links of ``groups`` one after the other (a message's, from its parts')."""
        groups = [group for group in groups if len(group)] or groups[:1]
        if len(groups) == 1:
            return groups[0]
        joined = cls()
        for name in ("_hrefs", "_urls", "_codes", "_reasons"):
            setattr(joined, name, Column.joined([getattr(g, name) for g in groups], ""))
        offset = 0
        for group in groups:
            joined._left.extend(index + offset for index in group._left)
            offset += len(group)
        return joined

    def __len__(self) -> int:
        return len(self._hrefs)

    @overload
    def __getitem__(self, index: int) -> LinkResult: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[LinkResult]: ...

    def __getitem__(self, index: int | slice) -> LinkResult | Sequence[LinkResult]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError("link index out of range")
        index %= len(self)
        at = bisect.bisect_left(self._left, index)
        if at < len(self._left) and self._left[at] == index:
            return LinkResult(self._hrefs[index], None, self._reasons[at], self._codes[at])
        return LinkResult(self._hrefs[index], self._urls[index])

    @property
    def tracked(self) -> int:
        """How many were rewritten."""
        return len(self) - len(self._left)

    def untracked(self, limit: int | None = None) -> list[LinkResult]:
        """The first ``limit`` (all by default) of those left alone."""
        count = len(self._left) if limit is None else min(limit, len(self._left))
        return [LinkResult(self._hrefs[self._left[at]], None, self._reasons[at], self._codes[at])
                for at in range(count)]


@dataclass(frozen=True, slots=True)
class PartResult:
    path: str  # "1.2": second child of the first child; "" for a single-part message
    content_type: str
    rewritten: bool
    reason: str  # what was done, or why the part was left alone
    links: Links = field(default_factory=Links)
    pixel: bool = False


@dataclass(frozen=True, slots=True)
class Report:
    parts: tuple[PartResult, ...]
    dkim: str = ""  # what was done about an existing DKIM-Signature
    clicks: bool = False  # whether links were looked at (click tracking on)

    @property
    def links(self) -> Links:
        return Links.joined([part.links for part in self.parts])

    @property
    def links_rewritten(self) -> int:
        return sum(part.links.tracked for part in self.parts)

    def links_text(self, limit: int = 20) -> str:
        """``5/6 tracked`` and each link left alone with its reason (the first ``limit``),
        without its userinfo, query and fragment (:func:`urls.redacted`)."""
        links = self.links
        text = f"{links.tracked}/{len(links)} tracked"
        left = links.untracked(limit)
        if left:
            listed = "; ".join(f"{_shorten(urls.redacted(link.href), 100)} ({link.reason})"
                               for link in left)
            more = len(links) - links.tracked - len(left)
            text += f", untracked: {listed}" + (f"; {more} more" if more else "")
        return text


def _shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[:length - 1] + "…"


class Prepared:
    """A message ready to be rendered once per recipient."""

    __slots__ = (
        "will_change",
        "reason",
        "report",
        "_raw",
        "_statics",
        "_slots",
        "_urls",
        "_pixel",
        "_eol",
        "_dkim",
        "_dkim_headers",
        "html",
    )

    def __init__(self, raw: bytes, reason: str, report: Report, plan: _Plan | None = None) -> None:
        self.will_change = plan is not None
        self.reason = reason
        self.report = report
        self._raw = raw
        # the first HTML part's text when the message changes, for the click map
        self.html = plan.html if plan is not None else None
        if plan is not None:
            self._statics = Column(plan.statics, b"")
            self._slots = array("q", plan.slots)
            self._urls = Column(plan.urls, "")
            self._pixel, self._eol = plan.pixel, plan.eol
            self._dkim, self._dkim_headers = plan.dkim, plan.dkim_headers

    @property
    def links(self) -> Links | None:
        """The links as the message goes out, each rewritten or left alone with its reason;
        ``None`` when they were not looked at (clicks off) or the message goes out unchanged
        although some were to be rewritten (a DKIM signature without a key: the reason says)."""
        links = self.report.links
        if not self.report.clicks or (not self.will_change and self.report.links_rewritten):
            return None
        return links

    @property
    def tokens(self) -> int:
        """How many tokens each rendering signs (what its cost grows with)."""
        return len(self._urls) + self._pixel if self.will_change else 0

    def render(self, email_id: str, recipient: str, keyring: Keyring) -> bytes:
        """The message for one recipient (the input itself when nothing changes)."""
        rendering = self.rendering(email_id, recipient, keyring)
        rendering.sign(self.tokens)
        return rendering.message()

    def rendering(self, email_id: str, recipient: str, keyring: Keyring) -> Rendering:
        """The message for one recipient, to be built a few tokens at a time."""
        return Rendering(self, email_id, recipient, keyring)


class Rendering:
    """One recipient's copy of a :class:`Prepared` message, its tokens signed in steps.

    A copy of a newsletter with 100,000 links signs 100,000 tokens (about a second): signed a
    step at a time, between other work of the event loop, rather than in one go or on a
    worker thread (whose every hand-off of the GIL to the event loop waits up to the switch
    interval, which made the same work three times slower and the loop's stalls longer).
    """

    __slots__ = ("_prepared", "_signer", "_tokens", "_ends")

    def __init__(self, prepared: Prepared, email_id: str, recipient: str,
                 keyring: Keyring) -> None:
        self._prepared = prepared
        self._signer = RecipientSigner(keyring, email_id, recipient) if prepared.will_change \
            else None
        # the quoted-printable lines of the tokens, by the index of their URL, and where each
        # ends (in one piece, as Column keeps them, for the garbage collector)
        self._tokens = bytearray()
        self._ends = array("q", [0])

    def sign(self, count: int) -> bool:
        """Sign up to ``count`` more tokens; whether all of them are signed now."""
        p, signer = self._prepared, self._signer
        if signer is None:
            return True
        done, eol = len(self._ends) - 1, p._eol
        for index in range(done, min(done + count, len(p._urls))):
            self._tokens += mime.qp_wrap_safe(signer.click(p._urls[index]), eol)
            self._ends.append(len(self._tokens))
        return len(self._ends) - 1 == len(p._urls)

    def message(self) -> bytes:
        """The copy, once every token is signed."""
        p, signer, ends = self._prepared, self._signer, self._ends
        if signer is None:
            return p._raw
        assert len(ends) - 1 == len(p._urls), "tokens left to sign"
        pixel = mime.qp_wrap_safe(signer.open(), p._eol) if p._pixel else b""
        statics, tokens = memoryview(p._statics.text), memoryview(self._tokens)
        out = bytearray(statics[slice(*p._statics.span(0))])
        for n, index in enumerate(p._slots, 1):  # index _OPEN: the pixel
            out += pixel if index == _OPEN else tokens[ends[index] : ends[index + 1]]
            out += statics[slice(*p._statics.span(n))]
        message = bytes(out)
        if p._dkim is not None:
            message = p._dkim.sign(message, p._dkim_headers)
        return message


def prepare(raw: bytes, options: RewriteOptions, headers: HeaderBlock | None = None
            ) -> Prepared:
    """Plan the rewrite of ``raw``, whose header block is ``headers`` when the caller has read
    it already. Never raises: whatever fails leaves the message as it is."""
    try:
        return _prepare(raw, options, headers)
    except Exception as exc:  # fail safe: a bug here must never lose or mangle a message
        return Prepared(
            raw, f"left untouched after an internal error ({type(exc).__name__})", Report(())
        )


@dataclass
class _Plan:
    """The output as static byte pieces with a gap for a token (by index) between them; each
    gap starts a quoted-printable line."""

    eol: str
    statics: list[bytes]
    slots: list[int]
    urls: list[str]
    pixel: bool = False
    dkim: DkimSigner | None = None
    dkim_headers: tuple[bytes, ...] | None = None
    html: str | None = None  # mime.first_html of the message


@dataclass(frozen=True, slots=True)
class _Click:
    url: str


@dataclass(frozen=True, slots=True)
class _Open:
    pass


_Piece = str | _Click | _Open
_Edit = tuple[int, int, list[_Piece]]  # replace text[start:end] with the pieces


def _prepare(raw: bytes, options: RewriteOptions, headers: HeaderBlock | None) -> Prepared:
    if not (options.opens or options.clicks):
        return Prepared(raw, "opens and clicks both off", Report(()))
    if not TRACKING_BASE.fullmatch(options.base_url):
        return Prepared(raw, f"tracking base URL {options.base_url!r} unusable", Report(()))
    eol = mime.line_ending(raw)
    results: list[PartResult] = []
    part_edits: list[tuple[mime.Part, _PartPlan]] = []
    decoded: dict[str, str] = {}
    root = mime.split(raw, headers)
    for part, signed in _leaves(root):
        result, part_plan = _plan_part(raw, part, options, signed)
        results.append(result)
        if part_plan is not None:
            part_edits.append((part, part_plan))
            decoded[part.path] = part_plan.decoded
    report = Report(tuple(results), clicks=options.clicks)
    if not part_edits:
        return Prepared(raw, _nothing_reason(results), report)
    dkim, dkim_headers, dkim_note, removals = _dkim_plan(raw, root.headers, options)
    report = Report(report.parts, dkim_note, options.clicks)
    if dkim_note and dkim is None:
        return Prepared(raw, dkim_note, report)
    plan = _assemble(raw, part_edits, removals, eol.decode("ascii"))
    plan.dkim, plan.dkim_headers = dkim, dkim_headers
    plan.html = mime.first_html(raw, root, decoded)
    return Prepared(raw, _summary(report), report, plan)


@dataclass(frozen=True, slots=True)
class _PartPlan:
    text: str  # the decoded HTML, line breaks as "\r\n" or "\n"
    edits: list[_Edit]
    decoded: str  # as decoded, before lone CRs were made line breaks


def _leaves(part: mime.Part) -> Iterator[tuple[mime.Part, bool]]:
    """The leaves of the MIME tree, each with whether a ``multipart/signed`` (S/MIME, PGP/MIME;
    RFC 1847) holds it: a changed byte there would break the signature."""
    if part.content_type == "multipart/signed":
        for leaf in mime.leaves(part):
            yield leaf, True
    elif part.children:
        for child in part.children:
            yield from _leaves(child)
    else:
        yield part, False


def _plan_part(
    raw: bytes, part: mime.Part, options: RewriteOptions, signed: bool
) -> tuple[PartResult, _PartPlan | None]:
    """The part's report and, when it is to be rewritten, its edits in decoded HTML."""
    skip = _why_not_trackable(part) or (SIGNED_PART if signed else "")
    if skip:
        return PartResult(part.path, part.content_type, False, skip), None
    try:
        decoded = mime.decode_text(mime.transfer_decode(raw, part), part.params.get("charset"))
    except DecodeError as exc:
        return PartResult(part.path, part.content_type, False, f"undecodable: {exc}"), None
    text = decoded
    if "\r" in text and _LONE_CR.search(text):  # lone CRs would not survive QP; HTML reads
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # them as line breaks anyway
    found = markup.scan(text)
    edits: list[_Edit] = []
    links: list[LinkResult] = []
    if options.clicks:
        links = [_link(tag, options, edits) for tag in found.links]
    pixel = False
    if options.opens and (found.body_close is not None or found.stuck_at is None):
        at = len(text) if found.body_close is None else found.body_close
        edits.append((at, at, [f'<img src="{options.base_url}/o/', _Open(), _PIXEL_TAIL]))
        pixel = True
    if not edits:
        reason = f"no link to rewrite among {len(links)}"
        if options.opens:
            reason = "no link to rewrite, and the document ends inside a tag, comment or raw text"
        return PartResult(part.path, part.content_type, False, reason, Links(links)), None
    edits.extend(_meta_charset_edits(found.metas))
    rewritten = sum(link.rewritten for link in links)
    reason = f"rewrote {rewritten} of {len(links)} links" + (", pixel inserted" if pixel else "")
    result = PartResult(part.path, part.content_type, True, reason, Links(links), pixel)
    return result, _PartPlan(text, edits, decoded)


def _why_not_trackable(part: mime.Part) -> str:
    if part.problem:
        return part.problem
    if part.content_type != "text/html":
        return "not text/html"
    if part.attachment:
        return "attachment"
    return ""


def _link(tag: markup.Tag, options: RewriteOptions, edits: list[_Edit]) -> LinkResult:
    href = tag.attrs["href"]
    written = href.value or ""
    url, reason = _classify(tag, options)
    if isinstance(reason, urls.Url):
        edits.append((href.start, href.end, [f"{options.base_url}/c/", _Click(url)]))
        return LinkResult(written, url)
    return LinkResult(written, None, reason.detail, reason.code)


def _classify(tag: markup.Tag, options: RewriteOptions) -> tuple[str, urls.Url | urls.Refusal]:
    """The URL as written (entity references decoded, for the token) and where it leads, or
    why it is not tracked."""
    for name in OPT_OUT_ATTRIBUTES:
        if name in tag.attrs:
            return "", urls.Refusal(OPT_OUT, f"opt-out attribute {name}")
    clicktracking = tag.attrs.get("clicktracking")
    if clicktracking and markup.unescape_attr(clicktracking.value or "").strip().lower() == "off":
        return "", urls.Refusal(OPT_OUT, "opt-out attribute clicktracking=off")
    value = markup.unescape_attr(tag.attrs["href"].value or "").strip(urls.C0_OR_SPACE)
    judged = urls.judge(value)
    if isinstance(judged, urls.Refusal):
        return value, judged
    host = judged.host.removesuffix(".")
    if host == _tracking_host(options.base_url):
        return value, urls.Refusal(TRACKING_HOST, "already a tracking link")
    for excluded in options.excluded_hosts:
        excluded = excluded.lower().rstrip(".")
        if host == excluded or host.endswith("." + excluded):
            return value, urls.Refusal(EXCLUDED_HOST, f"excluded host {excluded}")
    return value, judged


@functools.lru_cache(maxsize=64)
def _tracking_host(base_url: str) -> str:
    parsed = urls.parse(base_url)
    return parsed.host if isinstance(parsed, urls.Url) else ""


def _meta_charset_edits(metas: tuple[markup.Tag, ...]) -> list[_Edit]:
    """Edits that make every ``<meta>`` charset declaration say UTF-8."""
    edits: list[_Edit] = []
    for tag in metas:
        declared = markup.meta_charset(tag)
        if declared is not None and not _is_utf8_label(declared.label):
            edits.append((declared.start, declared.end, ["utf-8"]))
    return edits


def _is_utf8_label(label: str) -> bool:
    return label.strip().lower() in ("utf-8", "utf8", "unicode-1-1-utf-8")


def _dkim_plan(
    raw: bytes, block: HeaderBlock, options: RewriteOptions
) -> tuple[DkimSigner | None, tuple[bytes, ...] | None, str, list[tuple[int, int]]]:
    """(signer, headers to sign, note, header spans to drop) for the message's DKIM state."""
    signatures = block.all("dkim-signature")
    if not signatures:
        return None, None, "", []
    domains = [signature_tags(raw, header).get("d", "?") for header in signatures]
    signer = options.dkim
    if signer is None or signer.domain.lower() not in domains:
        return None, None, f"DKIM-Signature present and no key for {domains[0]}", []
    ours = signatures[domains.index(signer.domain.lower())]
    names = signature_tags(raw, ours).get("h", "")
    headers = tuple(name.encode("ascii") for name in names.split(":") if name) or None
    removals = [(header.start, header.end) for header in signatures]
    try:  # an unusable key must show now, not once per recipient
        signer.sign(_without(raw, removals), headers)
    except Exception as exc:  # dkimpy raises several unrelated types for bad keys
        return None, None, f"DKIM key for {signer.domain} unusable: {exc}", []
    note = f"re-signed for {signer.domain}, dropped {len(signatures)} old DKIM-Signature"
    return signer, headers, note, removals


def _without(raw: bytes, spans: list[tuple[int, int]]) -> bytes:
    pieces, pos = [], 0
    for start, end in sorted(spans):
        pieces.append(raw[pos:start])
        pos = end
    pieces.append(raw[pos:])
    return b"".join(pieces)


def _assemble(
    raw: bytes,
    part_plans: list[tuple[mime.Part, _PartPlan]],
    removals: list[tuple[int, int]],
    eol: str,
) -> _Plan:
    """Join the untouched byte ranges of ``raw`` and the re-encoded parts into a plan."""
    plan = _Plan(eol, [b""], [], [])
    url_index: dict[str, int] = {}
    byte_edits: list[tuple[int, int, bytes | _PartPlan]] = [
        (start, end, b"") for start, end in removals
    ]
    for part, part_plan in part_plans:
        byte_edits.extend(mime.header_edits(raw, part))
        byte_edits.append((part.body_start, part.end, part_plan))
    pos = 0
    for start, end, replacement in sorted(byte_edits, key=lambda edit: edit[:2]):
        plan.statics[-1] += raw[pos:start]
        if isinstance(replacement, bytes):
            plan.statics[-1] += replacement
        else:
            _encode_body(plan, replacement, url_index)
        pos = end
    plan.statics[-1] += raw[pos:]
    plan.urls = list(url_index)
    return plan


def _encode_body(plan: _Plan, part_plan: _PartPlan, url_index: dict[str, int]) -> None:
    """Append the part's new body: static text as quoted-printable, a slot for each token."""
    text = part_plan.text
    parts: list[str] = []
    pending: list[str] = []
    pos = 0
    for start, end, pieces in sorted(part_plan.edits, key=lambda edit: edit[:2]):
        pending.append(text[pos:start])
        for piece in pieces:
            if isinstance(piece, str):
                pending.append(piece)
                continue
            parts.append("".join(pending))
            pending = []
            if isinstance(piece, _Open):
                plan.pixel = True
                plan.slots.append(_OPEN)
            else:
                plan.slots.append(url_index.setdefault(piece.url, len(url_index)))
        pos = end
    pending.append(text[pos:])
    parts.append("".join(pending))
    encoded = mime.qp_encode_parts(parts, plan.eol.encode("ascii"))
    plan.statics[-1] += encoded[0]
    plan.statics.extend(encoded[1:])


def _nothing_reason(results: list[PartResult]) -> str:
    html = [result for result in results if result.content_type == "text/html"]
    if not html:
        return "no text/html part"
    return "; ".join(
        f"{'part ' + result.path + ': ' if result.path else ''}{result.reason}" for result in html
    )


def _summary(report: Report) -> str:
    pixels = sum(part.pixel for part in report.parts if part.rewritten)
    total = len(report.links)
    texts = [f"rewrote {report.links_rewritten} of {total} link{'s' if total != 1 else ''}"]
    if not report.clicks:
        texts = []
    if pixels:
        texts.append("pixel inserted" if pixels == 1 else f"{pixels} pixels inserted")
    text = ", ".join(texts)
    if report.dkim:
        text += f"; {report.dkim}"
    return text
