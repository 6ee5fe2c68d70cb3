"""Account linking: one person, one subject, safely (the link store, the ceremony, the operator commands).

The core never imports this package: the store reaches the pipeline through the identity-resolver contract
(entry point `linking`), and its routes through the route-provider contract, like any plugin.
"""

from .ceremony import Answer, LinkingCeremony
from .store import (
    LinkConflict,
    LinkedLogin,
    LinkError,
    LinkLimitReached,
    LinkStore,
    LinkTokenReplayed,
    Login,
    SingleUse,
    open_store,
)

__all__ = [
    "Answer",
    "LinkConflict",
    "LinkError",
    "LinkLimitReached",
    "LinkStore",
    "LinkTokenReplayed",
    "LinkedLogin",
    "LinkingCeremony",
    "Login",
    "SingleUse",
    "open_store",
]
