"""Fuzz target (atheris, coverage-guided): the URL policy on arbitrary URLs (no network: a fixed resolver).

Any URL must be accepted with only public addresses, or refused with a domain error.

    python tests/gateway/fuzz/fuzz_url_policy.py SEED_DIR -max_total_time=60
"""

import asyncio

import atheris

with atheris.instrument_imports(include=["omnigate_gateway"]):
    from omnigate_gateway.media.policy import DestinationChecker, UrlPolicy, forbidden_reason
    from omnigate_gateway.media.resolver import StaticResolver

from _harness import run

CHECKER = DestinationChecker(
    UrlPolicy(denied_domains=("denied.example",)),
    StaticResolver({"public.example": "93.184.215.14", "private.example": ["93.184.215.14", "10.0.0.1"]}),
)
LOOP = asyncio.new_event_loop()


def check(data: bytes) -> None:
    url = data.decode("utf-8", errors="replace")
    destination = LOOP.run_until_complete(CHECKER.check(url, shown_as="the URL"))
    for address in destination.addresses:
        if forbidden_reason(address) is not None:
            raise AssertionError(f"{url!r} was allowed to reach {address}")


if __name__ == "__main__":
    run(check)
