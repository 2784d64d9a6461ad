"""The flows: ingest (local broker -> inbox), pipeline (inbox -> inference -> outbox), uplink
(outbox -> cloud broker), and the executor policy that places each reading.

Imports the packages below it (base, config, routing, store, transport, inference, service);
never ota, app or cli.
"""
