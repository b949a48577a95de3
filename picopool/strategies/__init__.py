"""Balance strategies: how picopool picks one instance among those that can serve.

Write your own by implementing :class:`BalanceStrategy`'s ``pick``.
"""

from ._base import BalanceStrategy, Candidate
from ._builtin import LeastConnections, Random, RoundRobin, Weighted

__all__ = ["BalanceStrategy", "Candidate", "LeastConnections", "Random", "RoundRobin", "Weighted"]

for _name in __all__:
    globals()[_name].__module__ = __name__
