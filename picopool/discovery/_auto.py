from __future__ import annotations

import logging

from ._base import DiscoveryContext, DiscoveryProvider
from ._streaming import Streaming

logger = logging.getLogger("picopool.discovery")


async def detect_provider(ctx: DiscoveryContext) -> DiscoveryProvider:
    """Pick a provider for a DSN given without ``discovery=``.

    Plain PostgreSQL gets :class:`Streaming` (seed hosts plus a role probe).
    """
    provider: DiscoveryProvider = Streaming()
    logger.info("discovery: using %r (auto-detected)", provider)
    return provider
