from __future__ import annotations

from collections.abc import Sequence

from .._topology import Address, Instance, Role
from ._base import Discovered, DiscoveryContext, DiscoveryProvider, address_id


class Static(DiscoveryProvider):
    """A fixed list of instances (by default the DSN's hosts); roles are not checked.

    Every instance is taken as able to serve anything, so use it for a single
    server, a symmetric cluster, or a proxy in front of one.
    """

    name = "static"

    def __init__(self, addresses: Sequence[str | Address] | None = None) -> None:
        self._addresses = (
            None
            if addresses is None
            else tuple(a if isinstance(a, Address) else Address.parse(a) for a in addresses)
        )

    async def discover(self, ctx: DiscoveryContext) -> Discovered:
        addresses = self._addresses if self._addresses is not None else ctx.seeds
        return Discovered(
            tuple(Instance(id=address_id(a), address=a, role=Role.UNKNOWN) for a in addresses)
        )

    def __repr__(self) -> str:
        shown = "dsn" if self._addresses is None else ", ".join(map(str, self._addresses))
        return f"Static({shown})"
