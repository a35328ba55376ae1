"""The Document: (id, text, metadata) flowing through every data pipeline step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Document:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "text": self.text, "metadata": self.metadata}, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Document":
        return cls(id=str(d["id"]), text=d["text"], metadata=d.get("metadata") or {})
