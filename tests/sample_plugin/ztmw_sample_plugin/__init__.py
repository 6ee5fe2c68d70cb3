"""Sample third-party plugins for ztmw, written against its public API only.

- `static-api-key` (entry point group `ztmw.verifiers`): opaque API keys checked against a table of SHA-256
  hashes in the plugin's settings, in constant time.
- `ip-reputation` (group `ztmw.trust_evaluators`): lowers the authentication level to 0 for callers whose
  address is in a configured deny list, and says so in the assessment's inputs.

docs/plugins.md walks through this package.
"""

from .api_key import StaticApiKeyVerifier, hash_key
from .ip_reputation import IpReputationEvaluator

__all__ = ["IpReputationEvaluator", "StaticApiKeyVerifier", "hash_key"]
