"""Declaring which parameters of a PyTorch model are shared and which are personal.

A fedge model is *shared layers + a personal head*. Roles are given as name
prefixes of ``model.named_parameters()`` (``"base"`` matches ``base.0.weight``
and ``base.2.bias`` but not ``baseline.w``). Every parameter must match exactly
one role, and every prefix must match at least one parameter, so a typo fails
loudly instead of silently sharing (or keeping private) the wrong layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from device_agent.errors import FedgeError


class Role(str, Enum):
    """Whether a parameter is federated (``shared``) or never leaves the device (``personal``)."""

    SHARED = "shared"
    PERSONAL = "personal"


class ParameterSplitError(FedgeError):
    """The shared/personal declaration does not fit the model's parameter names."""


def matches_prefix(name: str, prefix: str) -> bool:
    """True when ``name`` is ``prefix`` or lies under it (``head`` matches ``head.weight``, not ``header.w``)."""
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True, kw_only=True)
class ParameterSplit:
    """Name prefixes of the shared and personal parameters.

    ``personal`` may be empty (plain FedAvg/FedProx: everything is shared);
    ``shared`` may not. ``shared=("*",)`` means "every parameter not personal".
    """

    shared: tuple[str, ...]
    personal: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_name in ("shared", "personal"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                raise TypeError(f"{field_name} must be a sequence of prefixes, not a string")
            object.__setattr__(self, field_name, tuple(value))
        if not self.shared:
            raise ValueError("at least one shared prefix is required")
        both = set(self.shared) & set(self.personal)
        if both:
            raise ParameterSplitError(f"prefixes declared both shared and personal: {sorted(both)}")

    def assign(self, parameter_names: Sequence[str]) -> dict[str, Role]:
        """Map every parameter name to its role; raise ParameterSplitError on any mismatch."""
        names = list(parameter_names)
        unmatched_prefixes = [
            p for p in (*self.personal, *(s for s in self.shared if s != "*")) if not any(matches_prefix(n, p) for n in names)
        ]
        if unmatched_prefixes:
            raise ParameterSplitError(
                f"prefixes match no parameter: {unmatched_prefixes}; parameters are: {names}"
            )
        roles: dict[str, Role] = {}
        problems: list[str] = []
        for name in names:
            personal = any(matches_prefix(name, p) for p in self.personal)
            shared = any(matches_prefix(name, p) for p in self.shared if p != "*") or ("*" in self.shared and not personal)
            if personal and shared:
                problems.append(f"{name} matches both a shared and a personal prefix")
            elif not personal and not shared:
                problems.append(f"{name} matches neither a shared nor a personal prefix")
            else:
                roles[name] = Role.PERSONAL if personal else Role.SHARED
        if problems:
            raise ParameterSplitError("; ".join(problems))
        if not any(r is Role.SHARED for r in roles.values()):
            raise ParameterSplitError("no parameter is shared: nothing would be federated")
        return roles


def names_with_role(roles: dict[str, Role], role: Role) -> list[str]:
    """Parameter names holding ``role``, in model order."""
    return [n for n, r in roles.items() if r is role]


def parse_prefixes(text: str | Iterable[str]) -> tuple[str, ...]:
    """Parse ``"base,features"`` (CLI form) or an iterable into a tuple of prefixes."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(p.strip() for p in items if p.strip())
