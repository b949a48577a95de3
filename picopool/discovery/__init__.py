"""Discovery providers: how picopool learns a cluster's instances.

Each provider turns one source of truth into :class:`~picopool.Instance`
values. Implement :class:`DiscoveryProvider` to add another.
"""

from ._auto import detect_provider
from ._autofailover import AutoFailover
from ._base import Discovered, DiscoveryContext, DiscoveryProvider
from ._patroni import Patroni
from ._picodata import Picodata
from ._static import Static
from ._streaming import Streaming

__all__ = [
    "AutoFailover",
    "Discovered",
    "DiscoveryContext",
    "DiscoveryProvider",
    "Patroni",
    "Picodata",
    "Static",
    "Streaming",
    "detect_provider",
]
