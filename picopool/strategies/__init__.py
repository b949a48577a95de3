"""Balance strategies: how picopool picks one instance among those that can serve.

Write your own by implementing :class:`BalanceStrategy`'s ``pick``.
"""

from ._base import BalanceStrategy, Candidate, LatencySample
from ._builtin import LeastConnections, LeastLatency, Random, RoundRobin, Weighted

__all__ = ["BalanceStrategy", "Candidate", "LatencySample", "LeastConnections", "LeastLatency",
           "Random", "RoundRobin", "Weighted"]

for _name in __all__:
    globals()[_name].__module__ = __name__
