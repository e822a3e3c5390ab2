"""Test helpers shared by every beampipe plugin and by our users' own tests.

The fixtures come in through the ``pytest11`` entry point (``beampipe.testing.plugin``);
the classes here are for tests that want to drive an IOC or broker by hand.
"""

from ._broker import Broker, BrokerUnavailable, find_broker
from ._ioc import LOOPBACK_ENV, Ioc, IocError, pin_epics_to_loopback

__all__ = [
    "LOOPBACK_ENV",
    "Broker",
    "BrokerUnavailable",
    "Ioc",
    "IocError",
    "find_broker",
    "pin_epics_to_loopback",
]
