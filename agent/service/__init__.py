"""The service: what the agent tells systemd (sd_notify, READY/WATCHDOG/STATUS), the metrics
endpoint, and the logs' configuration.

Imports agent.base, agent.config and agent.routing; never store, transport, inference, flows,
ota, app or cli.
"""
