"""Every evaluation protocol by name, in one list: the measuring ones (eval/protocols/) and the
attacks (eval/attacks/), one module each."""

from __future__ import annotations

from erase.utils import EraseError

from .attacks import ClassInversion, ConceptInversion, NullLatent, PrefixAttack, RingABell
from .protocols import Cifar10Class, DigitsClass, DigitsPrompts, I2PNudity, Protocol, T2IUtility

PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (
    DigitsClass, Cifar10Class, DigitsPrompts, I2PNudity, T2IUtility,
    ClassInversion, ConceptInversion, PrefixAttack, RingABell, NullLatent)}


def get_protocol(name: str) -> type[Protocol]:
    if name not in PROTOCOLS:
        raise EraseError(f"unknown protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
