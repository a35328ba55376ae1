"""PII scrub: e-mail addresses, IP addresses and phone numbers -> placeholders.

`PIIScrubber(cfg)` is a pipeline step named "pii" that rewrites text and never drops a
document. Replacements are counted per kind in `stats.counters` (`email`, `ip`, `phone`,
plus `docs_changed`). Recipe section `[data.pii]`:

    kinds = ["email", "ip", "phone"]      # which kinds to scrub
    email_placeholder = "<EMAIL>"
    ip_placeholder = "<IP_ADDRESS>"
    phone_placeholder = "<PHONE>"
    scrub_private_ips = false             # true: also loopback/private/documentation addresses
    allow_emails = []                     # addresses (or "@domain") to leave as they are

Care against false positives: an IPv4 address must be four dot-separated numbers 0-255 not
glued to other digits, dots, dashes or letters (`3.11.4`, `1.2.3.4.5`, `v1.2.3.4`,
`pkg-3.1.1.3.tar.gz`, `2024.01.02` are not addresses), not announced as a version ("version
10.2.0.1", "release 10.0.0.1") and not made of four single digits (`2.3.1.1`); an
IPv6 address must parse, contain a digit and have three groups or a full 4-digit group
(`std::map`, `a::b`, `12:30:45` are not addresses); a phone number needs a leading `+`
country code and 8-15 digits, or the North-American `(555) 123-4567` / `555-123-4567` shape
(dates like `2024-01-02`, ISBNs and plain long numbers are left alone).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

from lmforge.data.document import Document
from lmforge.data.step import Step

KINDS = ("email", "ip", "phone")


@dataclass
class PIIConfig:
    enabled: bool = True
    kinds: list[Literal["email", "ip", "phone"]] = field(default_factory=lambda: list(KINDS))
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE>"
    scrub_private_ips: bool = False  # false: keep loopback, private, link-local and documentation addresses
    allow_emails: list[str] = field(default_factory=list)  # full addresses or "@domain" suffixes to keep

    def validate(self) -> None:
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds lists a kind twice: {self.kinds}")


EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.-]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\w)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_VERSION_CUE = re.compile(r"\b(?:version|release|ver\.?|v\.?|python|build|rev\.?)\s*$", re.IGNORECASE)
PHONE_INTL = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,8}){1,6}(?![\w-]|\.\d)")
PHONE_NANP = re.compile(r"(?<![\w.+-])(?:\(\d{3}\)[ .-]?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w-]|\.\d)")


class PIIScrubber(Step):
    name = "pii"

    def __init__(self, cfg: PIIConfig | None = None, sample_removed: int = 20):
        super().__init__(sample_removed)
        self.cfg = cfg or PIIConfig()
        self.kinds = set(self.cfg.kinds)
        allow = [a.lower() for a in self.cfg.allow_emails]
        self.allow_full = frozenset(a for a in allow if not a.startswith("@"))
        self.allow_domains = tuple(a for a in allow if a.startswith("@"))

    # -- one kind each ---------------------------------------------------------------------
    def _email(self, m: re.Match) -> str:
        addr = m.group().lower()
        if addr in self.allow_full or (self.allow_domains and addr.endswith(self.allow_domains)):
            return m.group()
        self._n["email"] += 1
        return self.cfg.email_placeholder

    def _ip_ok(self, addr: ipaddress._BaseAddress) -> bool:
        return self.cfg.scrub_private_ips or addr.is_global

    def _ipv4(self, m: re.Match) -> str:
        text = m.string
        if _VERSION_CUE.search(text, max(0, m.start() - 12), m.start()):
            return m.group()
        if len(m.group()) == 7:  # every part one digit: section numbers and versions (2.3.1.1), not hosts
            return m.group()
        if not self._ip_ok(ipaddress.IPv4Address(m.group())):
            return m.group()
        self._n["ip"] += 1
        return self.cfg.ip_placeholder

    def _ipv6(self, m: re.Match) -> str:
        s = m.group()
        groups = [g for g in re.split(r"[:.]", s) if g]
        if not any(c.isdigit() for c in s) or not (len(groups) >= 3 or any(len(g) == 4 for g in groups)):
            return s
        try:
            addr = ipaddress.IPv6Address(s)
        except ValueError:
            return s
        if not self._ip_ok(addr):
            return s
        self._n["ip"] += 1
        return self.cfg.ip_placeholder

    def _phone(self, m: re.Match) -> str:
        digits = sum(c.isdigit() for c in m.group())
        if not 8 <= digits <= 15 and not (m.re is PHONE_NANP and digits == 10):
            return m.group()
        self._n["phone"] += 1
        return self.cfg.phone_placeholder

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """Text with PII replaced, and how many of each kind were replaced."""
        self._n = {k: 0 for k in KINDS}
        if "email" in self.kinds and "@" in text:
            text = EMAIL.sub(self._email, text)
        if "ip" in self.kinds:
            if "." in text:
                text = IPV4.sub(self._ipv4, text)
            if "::" in text or text.count(":") >= 7:
                text = IPV6.sub(self._ipv6, text)
        if "phone" in self.kinds:
            if "+" in text:
                text = PHONE_INTL.sub(self._phone, text)
            text = PHONE_NANP.sub(self._phone, text)
        return text, self._n

    def process(self, docs: Iterable[Document]) -> Iterator[Document]:
        counters = self.stats.counters
        for doc in docs:
            if self.cfg.enabled and self.kinds:
                text, n = self.scrub(doc.text)
                if text != doc.text:
                    doc.text = text
                    counters["docs_changed"] += 1
                    for k, v in n.items():
                        if v:
                            counters[k] += v
            yield doc
