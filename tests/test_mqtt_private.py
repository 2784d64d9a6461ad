"""aiomqtt's and paho's private attributes are read in one place: one function each at the top of
agent/transport/mqtt.py, beside the upstream issue that explains why there is no public way.

The first test parses every module of agent/ that can hold an aiomqtt or paho object (it imports
aiomqtt, paho or agent.transport) and fails on a private attribute of another object read
anywhere else. The second fails, naming the attribute, when an aiomqtt or paho upgrade drops
one of them, before any behaviour test has to find out why.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho

from agent.transport import mqtt

AGENT = Path(__file__).resolve().parent.parent / "agent"
MQTT = AGENT / "transport" / "mqtt.py"

# The one function in agent/transport/mqtt.py allowed to read each private attribute.
ALLOWED = {
    "_paho": "_client",
    "_lost": "_disconnected",
    "_connack_wait": "_connected",
    "_pingreq_sent_at": "_ping_t",
    "_close_socket": "_sock_close",
    "_queue_packet": "_packet_queue",
    "_buffer_socket": "_sock",
}

HOLDERS = ("aiomqtt", "paho", "agent.transport")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _holds_transport_objects(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        if any(n == h or n.startswith(h + ".") for n in names for h in HOLDERS):
            return True
    return False


class _Reads(ast.NodeVisitor):
    """Private attributes read on anything but `self`/`cls`, with the enclosing top-level
    function (None at module level or inside a class)."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str | None, str, str]] = []
        self._top: str | None = None
        self._depth = 0

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        outer = self._top
        if self._depth == 0:
            self._top = node.name if not isinstance(node, ast.ClassDef) else None
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1
        self._top = outer

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _function

    def visit_Attribute(self, node: ast.Attribute) -> None:
        own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        if _private(node.attr) and not own:
            self.found.append((node.lineno, self._top, node.attr, ast.unparse(node)))
        self.generic_visit(node)


def _reads(path: Path) -> list[tuple[int, str | None, str, str]]:
    visitor = _Reads()
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


def test_private_attributes_of_aiomqtt_and_paho_are_read_only_in_their_one_place() -> None:
    """Outside the functions of agent/transport/mqtt.py named in ALLOWED, no module that can
    hold an aiomqtt or paho object reads another object's private attribute, and each of them
    reads exactly its own attribute, once."""
    holders = [p for p in sorted(AGENT.rglob("*.py"))
               if _holds_transport_objects(ast.parse(p.read_text(), str(p)))]
    assert MQTT in holders
    elsewhere = []
    for path in holders:
        for line, function, attr, text in _reads(path):
            if path == MQTT and ALLOWED.get(function or "") == attr:
                continue
            elsewhere.append(f"{path.relative_to(AGENT.parent)}:{line}: {text}")
    assert not elsewhere, (
        "private attributes read outside the private section of agent/transport/mqtt.py; "
        "read them through its functions, or add one there with the upstream issue that "
        f"explains why there is no public way: {elsewhere}")
    in_section = sorted((function or "", attr) for _, function, attr, _ in _reads(MQTT)
                        if function in ALLOWED)
    assert in_section == sorted(ALLOWED.items()), in_section


async def _inspect_a_client() -> None:
    client = aiomqtt.Client("127.0.0.1")
    paho_client = mqtt._paho(client)
    assert isinstance(paho_client, paho.Client), "aiomqtt.Client._client"
    assert isinstance(mqtt._lost(client), asyncio.Future), "aiomqtt.Client._disconnected"
    assert isinstance(mqtt._connack_wait(client), asyncio.Future), "aiomqtt.Client._connected"
    assert mqtt._pingreq_sent_at(paho_client) == 0.0, "paho.Client._ping_t"
    mqtt._close_socket(paho_client)  # no socket yet: nothing to close, but it must exist
    # Before a connect paho has no socket; `_sock` is where it keeps the one it reads.
    assert paho_client._sock is None, "paho.Client._sock"
    # Queued behind nothing and written at the next write: the queue takes raw bytes.
    assert inspect.signature(paho_client._packet_queue).parameters.keys() >= {
        "command", "packet", "mid", "qos"}, "paho.Client._packet_queue"


def test_each_private_attribute_still_exists_in_the_installed_aiomqtt_and_paho() -> None:
    """A fresh client has every private attribute the section reads, of the expected kind."""
    asyncio.run(_inspect_a_client())
