"""Deny by user agent, in Python: requests whose User-Agent contains one of
the configured words (any case) are answered 403; the others go on, marked
with `x-screened-by: python`.

config: {"deny": ["bot", "crawler"]}
Built by examples/build.sh into a fulcrum:plugin@0.2.0 filter.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.request_filter import (
    DirectResponse,
    RequestChanges,
    Verdict_Proceed,
    Verdict_Respond,
)
from wit_world.imports import request
from wit_world.imports.types import EditOp, HeaderEdit

DENY = []


class Lifecycle(exports.Lifecycle):
    def init(self, config: str) -> None:
        global DENY
        try:
            settings = json.loads(config or "{}")
        except ValueError as e:
            raise Err(f"bad config: {e}")
        unknown = sorted(set(settings) - {"deny"})
        if unknown:
            raise Err(f"bad config: unknown key {unknown[0]!r}, expected 'deny'")
        words = settings.get("deny", [])
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise Err("bad config: 'deny' must be a list of non-empty strings")
        DENY = [w.lower() for w in words]


class RequestFilter(exports.RequestFilter):
    def on_request(self):
        agent = (request.header("user-agent") or "").lower()
        for word in DENY:
            if word in agent:
                body = f"user agents with {word!r} are not served here\n".encode()
                return Verdict_Respond(
                    DirectResponse(403, [("content-type", "text/plain; charset=utf-8")], body)
                )
        screened = HeaderEdit(EditOp.SET, "x-screened-by", "python")
        return Verdict_Proceed(RequestChanges([screened], None, [], False))

    def on_response(self):
        return []
