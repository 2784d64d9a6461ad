"""Topics: MQTT topic-filter matching, which route takes a topic, and what to subscribe to.

Pure logic. Matching follows MQTT 3.1.1 section 4.7; a route is chosen in configuration order.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.config.settings import Route


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 matching of a topic against a filter with + and # wildcards."""
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False  # 4.7.2: wildcards at the first level do not match $SYS-style topics
    for index, wanted in enumerate(filter_levels):
        if wanted == "#":
            return True
        if index >= len(topic_levels):
            return False
        if wanted not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def route_for(routes: Sequence[Route], topic: str) -> Route | None:
    """The first route, in configuration order, with a filter that matches the topic."""
    for route in routes:
        if any(topic_matches(f, topic) for f in route.topics):
            return route
    return None


def subscriptions(routes: Sequence[Route]) -> list[str]:
    """Every distinct topic filter of every route, in configuration order."""
    seen: dict[str, None] = {}
    for route in routes:
        for topic_filter in route.topics:
            seen.setdefault(topic_filter)
    return list(seen)
