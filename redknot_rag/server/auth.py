"""Bearer keys and what they open: the caller's `Principal`.

- `admin_key` opens every route and every namespace (with no `admin_key`, `api_key` does).
- `api_key` opens the user routes over every namespace.
- A tenant key (`--tenant-key KEY=ns1,ns2`) opens the user routes over its namespaces only: /query and
  /retrieve elsewhere answer the same 404 as a namespace that does not exist, automatic KV reuse only
  matches chunks stored in its namespaces, and /abort_request only reaches its own requests.
- Admin-only routes: /ingest, GET and DELETE /documents, /flush_cache. A user key there gets 403.
With no key configured at all, the server is open and every caller is admin; with only `admin_key`,
the user routes are open to anonymous callers (every namespace) and the admin routes need the key.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.requests import Request

from redknot_rag.retrieval.docdb import UnknownNamespaceError
from redknot_rag.server.errors import ApiError


@dataclass(frozen=True)
class TenantKey:
    """A key bound to namespaces (parsed from `KEY=ns1,ns2`)."""

    key: str
    namespaces: frozenset[str]

    @staticmethod
    def parse(spec: str) -> TenantKey:
        from redknot_rag.retrieval.docdb import validate_namespace

        key, sep, names = spec.rpartition("=")
        if not sep or not key or not names:
            raise ValueError(f"tenant key must look like KEY=namespace[,namespace...], got {spec[:4]}...")
        return TenantKey(key, frozenset(validate_namespace(n.strip()) for n in names.split(",")))


@dataclass(frozen=True)
class Principal:
    """Who is calling: `name` is safe to log (never the key); `namespaces` None means every namespace."""

    name: str
    is_admin: bool
    namespaces: frozenset[str] | None = None

    @property
    def is_bound(self) -> bool:
        return self.namespaces is not None

    def require_namespace(self, namespace: str) -> None:
        """The same error as a namespace that does not exist: a tenant learns nothing about others."""
        if self.namespaces is not None and namespace not in self.namespaces:
            raise UnknownNamespaceError(namespace)


OPEN = Principal("open", is_admin=True)
ANONYMOUS = Principal("anonymous", is_admin=False)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return request.headers.get("x-api-key")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _same(a: str, b: str | None) -> bool:
    return b is not None and hmac.compare_digest(a.encode(), b.encode())


def authenticate(
    request: Request, api_key: str | None, admin_key: str | None, tenants: tuple[TenantKey, ...] = ()
) -> Principal:
    """The caller's Principal, or 401 (missing or unknown key)."""
    if api_key is None and admin_key is None and not tenants:
        return OPEN
    token = _bearer(request)
    user_routes_open = api_key is None and not tenants
    if token is None:
        if user_routes_open:
            return ANONYMOUS
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    if _same(token, admin_key):
        return Principal("admin", is_admin=True)
    if _same(token, api_key):
        return Principal("admin" if admin_key is None else "user", is_admin=admin_key is None)
    for i, t in enumerate(tenants):
        if _same(token, t.key):
            return Principal(f"tenant-{i}", is_admin=False, namespaces=t.namespaces)
    if user_routes_open:
        return ANONYMOUS
    raise ApiError(401, "invalid API key", {"WWW-Authenticate": "Bearer"})


def require_admin(p: Principal) -> None:
    if p is ANONYMOUS:
        raise ApiError(401, "missing API key: this route needs the admin key", {"WWW-Authenticate": "Bearer"})
    if not p.is_admin:
        raise ApiError(403, "this route needs the admin key")


def principal_of(request: Request) -> Principal:
    """The Principal the app's auth dependency stored on this request."""
    return getattr(request.state, "principal", OPEN)
