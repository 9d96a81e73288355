"""Private services for the chaos and connection-loss tests: started once per run, always removed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ..support import REPO
from .services import PrivateServices


@pytest.fixture(scope="session")
def private_services() -> Iterator[PrivateServices]:
    os.chdir(REPO)
    services = PrivateServices()
    try:
        services.start()
        print(f"\nprivate services started in {services.start_seconds}")
        yield services
    finally:
        services.close()
