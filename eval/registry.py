"""Every evaluation protocol by name: the measuring ones (eval/protocols.py) and the attacks (eval/attacks.py)."""

from __future__ import annotations

from erase.utils import EraseError

from .attacks import ATTACKS
from .protocols import MEASURES, Protocol

PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in MEASURES + ATTACKS}


def get_protocol(name: str) -> type[Protocol]:
    if name not in PROTOCOLS:
        raise EraseError(f"unknown protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
