"""What a pool reports as it works: subscribe with ``pool.add_event_listener(fn)``.

    def on_event(event: picopool.events.Event) -> None:
        if isinstance(event, picopool.events.StatementFinished) and event.duration > 1:
            print(event.instance, event.reason, event.duration)

    pool.add_event_listener(on_event)

Listeners run inline on the event loop: keep them quick, and never block.
"""

from .._events import (
    AcquireFinished,
    BreakerChanged,
    ConnectionClosed,
    ConnectionOpened,
    Event,
    Listener,
    RefreshFailed,
    ResetDone,
    StatementFinished,
    TopologyChanged,
)

__all__ = [
    "AcquireFinished",
    "BreakerChanged",
    "ConnectionClosed",
    "ConnectionOpened",
    "Event",
    "Listener",
    "RefreshFailed",
    "ResetDone",
    "StatementFinished",
    "TopologyChanged",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
