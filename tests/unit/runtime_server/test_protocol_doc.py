"""docs/protocol.md documents every error code the server can answer with."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_every_error_code_in_the_server_is_in_the_protocol_table():
    source = "\n".join(p.read_text() for p in (ROOT / "runtime_server").glob("*.py"))
    raised = set(re.findall(r'ApiError\(\s*\d{3},\s*"([a-z_]+)"', source))
    raised |= set(re.findall(r'error_response\(\s*\d{3},\s*"([a-z_]+)"', source))
    raised |= {"body_too_large", "not_found", "method_not_allowed"}  # from aiohttp's own exceptions
    doc = (ROOT / "docs" / "protocol.md").read_text()
    table = doc[doc.index("### Errors") :]
    documented = set(re.findall(r"`([a-z_]+)`", table))
    assert len(raised) > 20
    assert raised <= documented, sorted(raised - documented)
