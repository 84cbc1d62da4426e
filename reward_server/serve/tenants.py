"""Tenants: who a request is for, for fair scheduling, queue quotas and per-tenant metrics.

One rule for both doors (docs/API.md, "Tenants"):

- auth on (a token file or ``RLHF_AUTH_TOKENS``): the tenant is the name of the bearer token the
  call presented (``NAME:TOKEN`` lines of the token file; an unnamed token is ``token-N``, its
  position among the accepted tokens, never the token itself). A ``tenant`` metadata key (HTTP:
  an ``X-Tenant`` header) is ignored: a client cannot claim another tenant's share.
- auth off: the ``tenant`` metadata key (HTTP: ``X-Tenant``), else ``default``. A name must match
  ``[A-Za-z0-9_.-]{1,64}`` (else INVALID_ARGUMENT). At most `max_named` distinct names are kept;
  further ones are all the tenant ``other``, so the metrics' label values stay bounded.

`TenantResolver.of_metadata` is the one function that answers it; the servicer calls it once per
call and passes the name down (engine, batcher, metrics).
"""

from __future__ import annotations

from collections.abc import Iterable

from reward_server.config import TENANT_NAME
from reward_server.engine.batcher import DEFAULT_TENANT
from reward_server.errors import InvalidArgument

__all__ = ["DEFAULT_TENANT", "OTHER_TENANT", "TENANT_KEY", "TenantResolver", "valid_name"]

TENANT_KEY = "tenant"
"""The gRPC metadata key naming the tenant when auth is off (HTTP: the X-Tenant header)."""
OTHER_TENANT = "other"
"""The tenant of every metadata-named tenant beyond the first `max_named` (auth off)."""


def valid_name(name: str) -> bool:
    """Whether `name` may name a tenant: 1-64 of letters, digits, ``_``, ``.``, ``-``."""
    return TENANT_NAME.match(name) is not None


class TenantResolver:
    """Resolves the tenant of a call from its metadata (gRPC) or headers (HTTP)."""

    def __init__(self, named_tokens: Iterable[tuple[str, str]], max_named: int = 64) -> None:
        """`named_tokens`: (name, token) pairs of the accepted bearer tokens (empty: auth off).
        `max_named`: distinct metadata tenants kept before the rest become ``other``."""
        self._by_token = {tok: name for name, tok in named_tokens}
        self.auth = bool(self._by_token)
        self.max_named = max_named
        self._seen: set[str] = set()

    @property
    def known(self) -> list[str]:
        """The tenants that tokens name (auth on), sorted."""
        return sorted(set(self._by_token.values()))

    def of_token(self, authorization: str) -> str:
        """The tenant of an ``authorization`` value (``Bearer TOKEN``) that auth accepted;
        ``default`` for none (health checks with --open-health)."""
        if authorization.startswith("Bearer "):
            return self._by_token.get(authorization[len("Bearer ") :], DEFAULT_TENANT)
        return DEFAULT_TENANT

    def of_claim(self, claimed: str) -> str:
        """The tenant a request names itself (auth off): the name, ``default`` when empty,
        ``other`` beyond the first `max_named` names. InvalidArgument for a malformed name."""
        if not claimed:
            return DEFAULT_TENANT
        if claimed in self._seen or claimed == DEFAULT_TENANT:
            return claimed
        if not valid_name(claimed):
            raise InvalidArgument(
                f"tenant {claimed[:80]!r} is not a valid name: 1-64 letters, digits, '_', '.', '-'"
            )
        if len(self._seen) >= self.max_named:
            return OTHER_TENANT
        self._seen.add(claimed)
        return claimed

    def of_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The tenant of a gRPC call from its invocation metadata."""
        auth, claimed = "", ""
        for key, value in metadata or ():
            if key == "authorization":
                auth = value if isinstance(value, str) else value.decode()
            elif key == TENANT_KEY:
                claimed = value if isinstance(value, str) else value.decode(errors="replace")
        return self.of_token(auth) if self.auth else self.of_claim(claimed)

    def of_headers(self, authorization: str, claimed: str) -> str:
        """The tenant of an HTTP request (``Authorization`` and ``X-Tenant`` headers)."""
        return self.of_token(authorization) if self.auth else self.of_claim(claimed)
