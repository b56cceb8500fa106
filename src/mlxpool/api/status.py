"""`GET /`: a one-page dashboard of the pool (models, memory against the budget, queues, recent requests).

One self-contained HTML file (`status.html`: inline CSS, a small inline script), no build step. The script polls
`/admin/models` and `/admin/requests`; with API keys on it asks for a key once and keeps it in sessionStorage.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

PAGE = (resources.files("mlxpool.api") / "status.html").read_text(encoding="utf-8")


def _hash(tag: str) -> str:
    """The CSP source allowing exactly the page's inline `<tag>` block."""
    match = re.search(rf"<{tag}>(.*?)</{tag}>", PAGE, re.DOTALL)
    assert match is not None, f"status.html has no <{tag}> block"
    digest = hashlib.sha256(match.group(1).encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


# Only the page's own script and style run, it talks only to this server, and no other site may frame it.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_hash('script')}; style-src {_hash('style')}; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


async def status_page(request: Request) -> Response:
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}
    return HTMLResponse(PAGE, headers=headers)
