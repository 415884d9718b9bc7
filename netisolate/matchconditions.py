"""A webhook's matchConditions (CEL), decided where they are simple enough to decide offline.

The API server calls a webhook only when every matchCondition is true. The audit asks "would this
webhook be called for a pod in namespace N?", so it evaluates the common forms — comparisons of
request and object fields with string literals, `in` over lists and maps, `has()`, `startsWith` /
`endsWith`, `!`, `&&`, `||`, parentheses — against what is known about such a request. Anything else
(other functions, fields the audit cannot know such as the requester, syntax outside this subset)
is UNKNOWN: the finding it concerns is then marked uncertain, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

UNKNOWN: Any = type("Unknown", (), {"__repr__": lambda self: "UNKNOWN"})()
Truth = bool | None  # None: cannot be decided offline

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|(?P<op>==|!=|&&|\|\||[!()\[\],.])"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*))"
)


class UnsupportedError(ValueError):
    """The expression is outside the subset this module decides."""


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise UnsupportedError(f"cannot read {text[position : position + 20]!r}")
        kind = match.lastgroup or ""
        value = match.group(kind)
        tokens.append((kind, value[1:-1] if kind == "str" else value))
        position = match.end()
    return tokens


@dataclass
class _Parser:
    tokens: list[tuple[str, str]]
    context: Mapping[str, Any]
    at: int = 0

    def peek(self) -> str:
        return self.tokens[self.at][1] if self.at < len(self.tokens) else ""

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.at >= len(self.tokens) or (expected is not None and self.peek() != expected):
            raise UnsupportedError(f"expected {expected or 'more'} at token {self.at}")
        self.at += 1
        return self.tokens[self.at - 1]

    def expression(self) -> Any:
        left = self.conjunction()
        while self.peek() == "||":
            self.take()
            left = _or(left, self.conjunction())
        return left

    def conjunction(self) -> Any:
        left = self.unary()
        while self.peek() == "&&":
            self.take()
            left = _and(left, self.unary())
        return left

    def unary(self) -> Any:
        if self.peek() == "!":
            self.take()
            value = self.unary()
            return UNKNOWN if value is UNKNOWN else not _bool(value)
        return self.comparison()

    def comparison(self) -> Any:
        left = self.term()
        operator = self.peek()
        if operator not in ("==", "!=", "in"):
            return left
        self.take()
        right = self.term()
        if left is UNKNOWN or right is UNKNOWN:
            return UNKNOWN
        if operator == "in":
            if not isinstance(right, list | dict):
                raise UnsupportedError("`in` needs a list or a map on its right")
            return left in right
        return (left == right) is (operator == "==")

    def term(self) -> Any:
        kind, value = self.take()
        if kind == "str":
            result: Any = value
        elif value == "(":
            result = self.expression()
            self.take(")")
        elif value == "[":
            result = self.items()
        elif value in ("true", "false"):
            result = value == "true"
        elif value == "has":
            self.take("(")
            result = self.path(self.take()[1], presence=True)
            self.take(")")
        elif kind == "name":
            result = self.path(value)
        else:
            raise UnsupportedError(f"unexpected {value!r}")
        return self.methods(result)

    def items(self) -> Any:
        values = []
        while self.peek() != "]":
            values.append(self.term())
            if self.peek() != "]":
                self.take(",")
        self.take("]")
        return UNKNOWN if UNKNOWN in values else values

    def path(self, root: str, presence: bool = False) -> Any:
        """A field path such as object.metadata.labels['app']; unknown roots and fields are UNKNOWN.
        has() asks whether the last field is present, which CEL answers without an error."""
        node: Any = self.context.get(root, UNKNOWN)
        selected = False
        while self.peek() in (".", "[") and not self._method_next():
            if self.peek() == ".":
                self.take(".")
                key = self.take()[1]
            else:
                key = self._index()
            selected, last = True, self.peek() not in (".", "[")
            if node is UNKNOWN:
                continue
            if not isinstance(node, dict):
                raise UnsupportedError(f"cannot select {key!r} from {node!r}")
            if key not in node:
                if presence and last:
                    return False
                raise UnsupportedError(f"no field {key!r} (CEL evaluates that to an error)")
            node = node[key]
        if presence:
            if not selected:
                raise UnsupportedError("has() needs a field selection")
            return UNKNOWN if node is UNKNOWN else True
        return node

    def _method_next(self) -> bool:
        ahead = self.tokens[self.at + 1 : self.at + 3]
        return self.peek() == "." and len(ahead) == 2 and ahead[1][1] == "("

    def _index(self) -> str:
        self.take("[")
        kind, key = self.take()
        self.take("]")
        if kind != "str":
            raise UnsupportedError("only string keys are supported in an index")
        return key

    def methods(self, value: Any) -> Any:
        while self._method_next():
            self.take(".")
            method = self.take()[1]
            if method not in ("startsWith", "endsWith"):
                raise UnsupportedError(f"function {method}() is not supported")
            self.take("(")
            argument = self.term()
            self.take(")")
            if value is UNKNOWN or argument is UNKNOWN:
                value = UNKNOWN
            elif not isinstance(value, str) or not isinstance(argument, str):
                raise UnsupportedError(f"{method}() needs strings")
            else:
                value = value.startswith(argument) if method == "startsWith" else value.endswith(argument)
        return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise UnsupportedError(f"{value!r} is not a boolean")
    return value


def _and(left: Any, right: Any) -> Any:
    if left is False or right is False:
        return False
    return UNKNOWN if UNKNOWN in (left, right) else _bool(left) and _bool(right)


def _or(left: Any, right: Any) -> Any:
    if left is True or right is True:
        return True
    return UNKNOWN if UNKNOWN in (left, right) else _bool(left) or _bool(right)


def evaluate(expression: str, context: Mapping[str, Any]) -> Truth:
    """True or False when decided, None when the expression is outside the subset or depends on
    something UNKNOWN in context."""
    try:
        parser = _Parser(_tokens(expression), context)
        value = parser.expression()
        if parser.at != len(parser.tokens):
            raise UnsupportedError("trailing tokens")
    except (UnsupportedError, RecursionError):
        return None
    return None if value is UNKNOWN or not isinstance(value, bool) else value


def all_true(conditions: tuple[tuple[str, str], ...], context: Mapping[str, Any]) -> Truth:
    """Whether the API server would call the webhook: False once one condition is false, None when
    none is false but one cannot be decided."""
    results = [evaluate(expression, context) for _, expression in conditions]
    if False in results:
        return False
    return None if None in results else True


def pod_request(
    namespace: str,
    namespace_labels: Mapping[str, str],
    pod_labels: Mapping[str, str] | None = None,
    pod_annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """What is known of a pod CREATE request in a namespace; pod labels None: any pod (UNKNOWN)."""
    meta: dict[str, Any] = {"namespace": namespace, "name": UNKNOWN}
    meta["labels"] = dict(pod_labels) if pod_labels is not None else UNKNOWN
    meta["annotations"] = dict(pod_annotations) if pod_annotations is not None else UNKNOWN
    return {
        "request": {
            "namespace": namespace,
            "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "subResource": "",
            "userInfo": UNKNOWN,
            "dryRun": UNKNOWN,
            "name": UNKNOWN,
        },
        "object": {"metadata": meta, "spec": UNKNOWN, "kind": "Pod", "apiVersion": "v1"},
        "namespaceObject": {"metadata": {"name": namespace, "labels": dict(namespace_labels)}},
        "authorizer": UNKNOWN,
        "oldObject": None,
    }
