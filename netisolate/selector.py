"""Kubernetes label selectors, read as strictly as the API server reads them.

A selector that is not what the API server would accept raises SelectorError (the audit reports
the object as unreadable) instead of being guessed at: a guess could hide a webhook's reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not (present and labels[self.key] in self.values)
        return present if self.operator == "Exists" else not present

    def describe(self) -> str:
        """kubectl's selector syntax: `a=b`, `a in (b,c)`, `a notin (b)`, `a`, `!a`."""
        if self.operator == "Exists":
            return self.key
        if self.operator == "DoesNotExist":
            return f"!{self.key}"
        if self.operator == "In" and len(self.values) == 1:
            return f"{self.key}={self.values[0]}"
        return f"{self.key} {self.operator.lower()} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    """Every requirement must hold; no requirement (an absent or empty selector) matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def describe(self) -> str:
        return ",".join(r.describe() for r in self.requirements) or "everything"


def absent_as(value: object, default: object) -> object:
    """An absent (or null) field as its default; anything else as it is, to be checked: an empty
    mapping where a list belongs is a mistake, not an empty list."""
    return default if value is None else value


def _strings(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SelectorError(f"{where} must be a list of strings, not {value!r}")
    return tuple(value)


def _requirement(raw: object, where: str) -> Requirement:
    if not isinstance(raw, dict):
        raise SelectorError(f"{where} must be a mapping with key and operator, not {raw!r}")
    key, operator = raw.get("key"), raw.get("operator")
    if not isinstance(key, str) or not key:
        raise SelectorError(f"{where} has no key")
    if operator not in OPERATORS:
        raise SelectorError(f"{where}: operator {operator!r} is not one of {', '.join(OPERATORS)}")
    values = _strings(absent_as(raw.get("values"), []), f"{where}.values")
    if (operator in ("In", "NotIn")) != bool(values):
        need = "needs values" if operator in ("In", "NotIn") else "takes no values"
        raise SelectorError(f"{where}: {operator} {need}")
    return Requirement(key, operator, values)


def parse_selector(raw: object, where: str) -> Selector:
    """A LabelSelector (None: the field is absent, which matches everything)."""
    if raw is None:
        return Selector()
    if not isinstance(raw, dict):
        raise SelectorError(f"{where} must be a mapping (matchLabels, matchExpressions), not {raw!r}")
    match_labels = absent_as(raw.get("matchLabels"), {})
    if not isinstance(match_labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in match_labels.items()
    ):
        raise SelectorError(f"{where}.matchLabels must map strings to strings, not {match_labels!r}")
    expressions = absent_as(raw.get("matchExpressions"), [])
    if not isinstance(expressions, list):
        raise SelectorError(f"{where}.matchExpressions must be a list, not {expressions!r}")
    return Selector(
        (
            *(Requirement(k, "In", (v,)) for k, v in sorted(match_labels.items())),
            *(_requirement(e, f"{where}.matchExpressions[{i}]") for i, e in enumerate(expressions)),
        )
    )
