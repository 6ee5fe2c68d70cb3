"""The test kit: a development issuer, DPoP keys, client certificates and a clock tests can move.

Used by ztmw's own tests, by `ztmw demo`, and by app authors (the `pytest11` fixtures in ztmw.pytest_plugin).
"""

from .certs import ClientCert, TestCA
from .clock import FakeClock
from .dpop import DPoPKey
from .http import challenges, free_port
from .issuer import DevIssuer
from .lifetime import PluginLifetime

__all__ = ["ClientCert", "DPoPKey", "DevIssuer", "FakeClock", "PluginLifetime", "TestCA", "challenges", "free_port"]
