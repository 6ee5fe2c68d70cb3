"""Entry point `linking` in `ztmw.identity_resolvers`: the link store as an identity resolver, plus the
ceremony's routes.

`[linking] enabled = true` adds this resolver right after the static `config` links, with no further setting,
so the core's identity chain asks the store for every request's canonical subject without importing this
package. It is not `memo_safe`: a link or unlink must take effect on the very next request, so no allowed
decision that depends on the account is replayed from the decision memo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Mapping

from ..config import Config, check_plugin_settings
from ..errors import ConfigurationError
from ..typing import Clock, PluginDeps
from .ceremony import LinkingCeremony
from .store import LinkStore, Login, open_store

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import Pipeline


class LinkingResolver:
    name = "linking"

    def __init__(self, config: Config, store: LinkStore, *, clock: Clock, logger: Any) -> None:
        self.config = config
        self.store = store
        self._clock = clock
        self._log = logger
        self._ceremony: LinkingCeremony | None = None

    async def resolve(self, issuer: str, subject: str) -> str | None:
        return await self.store.account_of(Login(issuer, subject))

    def web_routes(self) -> Iterable[tuple[str, str, Callable[..., Awaitable[Any]]]]:
        from .web import routes  # the aiohttp edge, imported only where routes are mounted

        return routes(self.config.linking.path, self.ceremony_for)

    def ceremony_for(self, pipeline: "Pipeline") -> LinkingCeremony:
        """The ceremony verifies link tokens and resolves logins with the pipeline's own authenticator."""
        if self._ceremony is None:
            self._ceremony = LinkingCeremony(
                self.config, self.store, verify=pipeline.authenticator.verify,
                resolve=pipeline.authenticator.account_of, clock=self._clock, logger=self._log)
        return self._ceremony


def redis_prefix(config: Config) -> str | None:
    """A Redis store uses the `redis` resolver's prefix, so both read and write the same keys."""
    prefix = config.plugins.get("redis", {}).get("prefix")
    return prefix if isinstance(prefix, str) and prefix else None


def create(settings: Mapping[str, Any], deps: PluginDeps) -> LinkingResolver:
    check_plugin_settings(settings, "linking", hint="configure [linking]")
    if not deps.config.linking.enabled:
        raise ConfigurationError("identity.resolvers: 'linking' needs [linking] enabled = true")
    store = open_store(deps.config.linking.store, redis_prefix=redis_prefix(deps.config))
    deps.on_startup(store.start)
    deps.on_cleanup(store.close)
    return LinkingResolver(deps.config, store, clock=deps.clock, logger=deps.logger)
