"""PII scrub: placeholders and counts per kind, configuration, no false positives."""

from __future__ import annotations

import gzip
import json

import pytest

from lmforge.config import build
from lmforge.data.document import Document
from lmforge.data.pii import PIIConfig, PIIScrubber
from lmforge.errors import ConfigError


def scrub(text: str, **cfg) -> tuple[str, dict]:
    return PIIScrubber(PIIConfig(**cfg)).scrub(text)


@pytest.mark.parametrize(
    "text,expected,kind",
    [
        ("Write to john.doe+lists@mail.example.com today.", "Write to <EMAIL> today.", "email"),
        ("Contact: Jane_Roe@sub.uni-example.ac.uk.", "Contact: <EMAIL>.", "email"),
        ("The server 93.184.216.34 answered.", "The server <IP_ADDRESS> answered.", "ip"),
        ("Resolver at 149.112.112.112, port 53.", "Resolver at <IP_ADDRESS>, port 53.", "ip"),
        ("Reach 2a00:1450:4001:81c::200e now", "Reach <IP_ADDRESS> now", "ip"),
        ("Call +1 (415) 555-0132 or write.", "Call <PHONE> or write.", "phone"),
        ("Office: +44 20 7946 0958.", "Office: <PHONE>.", "phone"),
        ("Paris +33 1 42 68 53 00", "Paris <PHONE>", "phone"),
        ("Desk (415) 555-0132, cell 415-555-0199.", "Desk <PHONE>, cell <PHONE>.", "phone"),
    ],
)
def test_each_kind_replaced_and_counted(text, expected, kind):
    out, n = scrub(text)
    assert out == expected
    assert n[kind] == expected.count({"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>"}[kind])
    assert sum(n.values()) == n[kind]


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.4 was released on 2024-01-02 at 12:30:45.",
        "Requires version 10.2.0.1 or newer; see v1.2.3.4 and 1.2.3.4.5.",
        "Downloading novas-3.1.1.3.tar.gz (136kB)",
        "described in 2.3.1.1 of RFC 1952",
        "Dates: 2024.01.02, 02/01/2024, 2024-01-02T10:00:00Z",
        "ISBN 978-3-16-148410-0 and x = 1234567890 and 0x7fffffff and 3.14159",
        "std::vector<int> a::b; Foo::Bar::baz(); MAC 00:1a:2b:3c:4d:5e",
        "@property\ndef f(self): return user@localhost",
        "a = b +10 20; total +42",
        "print(f'{x:+08.3f}') and '+000000120'",
    ],
)
def test_no_false_positives(text):
    out, n = scrub(text)
    assert out == text and sum(n.values()) == 0


def test_private_ips_kept_unless_asked():
    text = "Bind to 127.0.0.1 or 192.168.1.20 or ::1 or fe80::1ff:fe23:4567:890a"
    assert scrub(text)[0] == text
    out, n = scrub(text, scrub_private_ips=True)
    assert out == "Bind to <IP_ADDRESS> or <IP_ADDRESS> or ::1 or <IP_ADDRESS>"  # "::1" is too short to be sure
    assert n["ip"] == 3


def test_kinds_placeholders_and_allow_list():
    text = "Mail a@example.org or docs@python.org, call +1 415 555 0132, host 93.184.216.34"
    out, n = scrub(text, kinds=["email"], email_placeholder="[email]", allow_emails=["@python.org"])
    assert out == "Mail [email] or docs@python.org, call +1 415 555 0132, host 93.184.216.34"
    assert n == {"email": 1, "ip": 0, "phone": 0}
    out, _ = scrub(text, kinds=["ip", "phone"], ip_placeholder="IP", phone_placeholder="TEL")
    assert out == "Mail a@example.org or docs@python.org, call TEL, host IP"


def test_step_counts_and_never_drops():
    docs = [Document("1", "x a@example.org y b@example.org"), Document("2", "nothing here"), Document("3", "ip 93.184.216.34")]
    step = PIIScrubber(PIIConfig())
    out = list(step(docs))
    assert [d.id for d in out] == ["1", "2", "3"]
    assert out[0].text == "x <EMAIL> y <EMAIL>"
    c = step.stats.counters
    assert c["email"] == 2 and c["ip"] == 1 and c["docs_changed"] == 2
    assert step.stats.docs_in == step.stats.docs_out == 3 and not step.stats.dropped
    assert step.name == "pii"


def test_config_validation():
    with pytest.raises(ConfigError, match="data.pii.kinds"):
        build(PIIConfig, {"kinds": ["email", "ssn"]}, "data.pii")
    with pytest.raises(ConfigError, match="unknown config key 'data.pii.placeholder'"):
        build(PIIConfig, {"placeholder": "x"}, "data.pii")
    with pytest.raises(ConfigError, match="twice"):
        build(PIIConfig, {"kinds": ["ip", "ip"]}, "data.pii")
    cfg = build(PIIConfig, {"kinds": ["phone"], "phone_placeholder": "<TEL>"}, "data.pii")
    assert PIIScrubber(cfg).scrub("call +1 415 555 0132")[0] == "call <TEL>"


def test_real_manpages_keep_their_version_numbers(sample_dir):
    """Manual pages are full of versions, dates and option values: only real addresses change."""
    with gzip.open(sample_dir / "multilingual" / "manpages-sample.jsonl.gz", "rt") as f:
        docs = [Document(r["id"], r["text"]) for r in map(json.loads, f)]
    step = PIIScrubber()
    before = {d.id: d.text for d in docs}
    out = list(step(docs))
    for d in out:
        if d.text != before[d.id]:
            # every change is a placeholder standing where an address or number was
            assert any(p in d.text for p in ("<EMAIL>", "<IP_ADDRESS>", "<PHONE>"))
    changed = sum(d.text != before[d.id] for d in out)
    assert changed == step.stats.counters["docs_changed"]
    # authors' e-mail addresses appear in manual pages and are scrubbed
    assert step.stats.counters["email"] >= 1
