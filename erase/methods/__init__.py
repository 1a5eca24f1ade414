"""Unlearning methods, one file each, registered by name in `METHODS`.

Every method talks only to the backbone interface (conditions, null condition, noise prediction,
noising, parameter groups, a frozen copy), so the same code runs on the class-conditional DDPM and
on Stable Diffusion.
"""

from __future__ import annotations

import pkgutil

from ..utils import EraseError
from .base import Method, MethodConfig
from .esd import ESD
from .eupmu import EUPMU
from .finetune import Finetune
from .ga import GA
from .gradtau import GradTau
from .lur import LUR
from .mox import MOX
from .rl import RL
from .salun import SalUn
from .surgery import Surgery

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    Finetune, GA, RL, SalUn, ESD, Surgery, MOX, GradTau, LUR, EUPMU)}

# The submodules are listed too, so that documentation tools (pdoc) walk them.
__all__ = ["METHODS", "Method", "MethodConfig", "get_method", "parse_methods",
           *sorted(m.name for m in pkgutil.iter_modules(__path__))]


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise EraseError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} (`erase methods` lists them)")
    return METHODS[name]


def parse_methods(text: str, also: dict[str, list[str]] | None = None) -> list[str]:
    """Method names from a comma-separated list, or every method for 'all'; duplicates dropped.

    `also` maps other accepted kinds of name to their names, e.g. {"recipes": [...]}, listed in the error.
    """
    also = also or {}
    names = list(METHODS) if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    known = set(METHODS).union(*also.values())
    if (unknown := [m for m in names if m not in known]) or not names:
        kinds = "".join(f", {kind} ({', '.join(values)})" for kind, values in also.items())
        raise EraseError(f"unknown method(s) {', '.join(unknown) or '(none given)'}: choose from the methods "
                         f"{', '.join(METHODS)}{kinds}, or 'all'")
    return list(dict.fromkeys(names))
