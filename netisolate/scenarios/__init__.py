"""Scenarios shared by the demo, the local node harness tests and the kind end-to-end suite: a pod,
the ports its containers listen on, and which connections must be open — everything else probed
must be blocked."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from netisolate.model import Pod, parse_pod


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)

    name: str
    description: str
    namespace_labels: dict[str, str] = Field(default_factory=dict)
    listeners: dict[str, list[str]]  # container -> ports in grant syntax ("8080", "53/udp")
    expect_open: dict[str, list[str]]  # client container -> "container:port[/udp]" it must reach
    pod: dict[str, Any]

    @model_validator(mode="after")
    def _names_exist(self) -> Scenario:
        names = {c.name for c in self.parsed_pod().all_containers()}
        targets = {f"{owner}:{port}" for owner, ports in self.listeners.items() for port in ports}
        for client, opened in self.expect_open.items():
            unknown = ({client} - names) | (set(opened) - targets)
            if unknown or not set(self.listeners) <= names:
                raise ValueError(f"scenario {self.name}: unknown containers or targets {sorted(unknown)}")
        return self

    def parsed_pod(self) -> Pod:
        return parse_pod(self.pod, f"scenario {self.name}")

    def expected(self, client: str, target: str) -> str:
        return "open" if target in self.expect_open.get(client, []) else "blocked"


def load(name: str) -> Scenario:
    return Scenario.model_validate(yaml.safe_load(files(__package__).joinpath(f"{name}.yaml").read_text()))


def names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in files(__package__).iterdir() if p.name.endswith(".yaml")
    )
