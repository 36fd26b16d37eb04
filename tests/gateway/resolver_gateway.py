"""Runs the real gateway with a fixed table of host names instead of DNS (for SSRF tests).

``OMNIGATE_TEST_HOSTS`` holds the table as JSON ({name: address or [addresses]}); names not in it do not
resolve. Everything else is the production ``serve`` with the usual OMNIGATE_GATEWAY_* settings.
Run as ``python -m tests.gateway.resolver_gateway`` from the repository root.
"""

from __future__ import annotations

import asyncio
import json
import os

from omnigate.lifecycle import configure_logging
from omnigate_gateway.main import serve
from omnigate_gateway.media.resolver import StaticResolver
from omnigate_gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.log_level)
    resolver = StaticResolver(json.loads(os.environ["OMNIGATE_TEST_HOSTS"]))
    asyncio.run(serve(settings, resolver=resolver))


if __name__ == "__main__":
    main()
