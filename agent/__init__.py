"""edge-agent: an offline-first daemon for IoT gateways (MQTT in, local LLM, SQLite, MQTT out)."""

__version__ = "0.1.0"
