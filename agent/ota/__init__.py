"""Over-the-air model updates: the update pipeline, start-up recovery, the model store's state,
the canary and probation, signed packages and directives, downloads, remote commands over MQTT,
and the incoming/ watcher.

Imports the packages below it (base, config, routing, store, transport, inference, service);
never flows, app or cli.
"""
