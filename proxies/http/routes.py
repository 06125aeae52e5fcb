"""``http.route``: configured route templates first, inference otherwise.

Strategy. A configured template (``/v2.1/servers/{id}/action``) is compiled to a
regular expression where each ``{name}`` matches one path segment; templates
are tried in config order and the first match wins, so list specific templates
before general ones. Without a match, and unless inference is off, the route is
*inferred* by replacing every path segment that looks like an identifier with
``{id}``:

- all digits (``/servers/42``);
- a UUID, with or without dashes, or anything that contains one or a run of
  32 hex digits (``req-<uuid>``, ``AUTH_<project id>``);
- 16 or more hex digits with at least one digit (image checksums, Keystone ids);
- a long random-looking token: 20+ characters of letters, digits, ``-`` and
  ``_`` mixing letters and digits.

Names (``os-hypervisors``, ``detail``, ``v2.1``) are kept, so the route still
says what was asked. Results are cached per path (bounded), because a
workload repeats a few paths many times.
"""

from __future__ import annotations

import re

_SEG_ID = re.compile(
    r"""^(?:
        [0-9]+
      | .*[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}.*
      | (?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{16,}
      | (?=[\w-]*[0-9])(?=[\w-]*[A-Za-z])[\w-]{20,}
    )$""",
    re.VERBOSE,
)
_PARAM = re.compile(r"\{[^{}/]+\}")
_CACHE_MAX = 8192


def looks_like_id(segment: str) -> bool:
    return bool(segment) and _SEG_ID.match(segment) is not None


def infer_route(path: str) -> str:
    """``/v2.1/servers/6f1c...-...`` -> ``/v2.1/servers/{id}``."""
    parts = path.split("/")
    changed = False
    for i, seg in enumerate(parts):
        if seg and looks_like_id(seg):
            parts[i] = "{id}"
            changed = True
    return "/".join(parts) if changed else path


def compile_template(template: str) -> re.Pattern[str]:
    """``/v2.1/servers/{id}`` -> a regex matching that path (optional trailing slash)."""
    out = []
    pos = 0
    for m in _PARAM.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append("[^/]+")
        pos = m.end()
    out.append(re.escape(template[pos:].rstrip("/")))
    return re.compile("".join(out) + "/?")


def check_template(template: str) -> str | None:
    """Why ``template`` is not a usable route template, or None."""
    if not template.startswith("/"):
        return "must start with '/'"
    if "?" in template or "#" in template:
        return "must be a path only (no '?' or '#')"
    rest = _PARAM.sub("", template)
    if "{" in rest or "}" in rest:
        return "has an unbalanced '{' or '}' (write parameters as {name})"
    return None


class RouteTable:
    """Configured templates plus optional inference, with a bounded per-path cache."""

    def __init__(self, templates: list[str] | tuple[str, ...] = (), infer: bool = True) -> None:
        self.templates = tuple(templates)
        self._compiled = [(t, compile_template(t)) for t in self.templates]
        self.infer = infer
        self._cache: dict[str, tuple[str | None, str | None]] = {}

    def route(self, path: str) -> tuple[str | None, str | None]:
        """(route, source) for ``path``; source is ``config`` or ``inferred``."""
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        result: tuple[str | None, str | None] = (None, None)
        for template, rx in self._compiled:
            if rx.fullmatch(path):
                result = (template, "config")
                break
        else:
            if self.infer:
                result = (infer_route(path), "inferred")
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[path] = result
        return result
