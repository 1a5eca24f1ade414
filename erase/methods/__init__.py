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


def parse_methods(text: str) -> list[str]:
    """Method names from a comma-separated list, or every method for 'all'."""
    names = list(METHODS) if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise EraseError(f"unknown method(s) {', '.join(unknown) or '(none given)'}: choose from "
                         f"{', '.join(METHODS)} or 'all'")
    return names
