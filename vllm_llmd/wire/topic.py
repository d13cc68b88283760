"""The llm-d KV-event topic: ``kv@<pod address>:<serving port>@<model>``.

Built on the engine side (:func:`vllm_llmd.events.topic.derive_topic` fills in the parts) and parsed
by the router's index, which uses ``<pod address>:<serving port>`` as the pod id (the HTTP endpoint
it routes to) and ``<model>`` as the root of the pod's block keys. Imports nothing of ``vllm_llmd``.
"""

from __future__ import annotations

PREFIX = "kv"
SEP = "@"


def make_topic(address: str, port: int, model: str) -> str:
    return f"{PREFIX}{SEP}{address}:{port}{SEP}{model}"


def parse_topic(topic: str) -> tuple[str, str] | None:
    """``kv@<host>:<port>@<model>`` -> ``("<host>:<port>", "<model>")``; ``None`` if it is not one."""
    parts = topic.split(SEP, 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]
