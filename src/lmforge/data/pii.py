"""PII scrub: e-mail addresses, IP addresses and phone numbers -> placeholders."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PIIConfig:
    enabled: bool = True
