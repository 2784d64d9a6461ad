"""Inference: the worker process that owns llama.cpp and its supervisor, the grammar fix, the
cloud model over HTTP, and the switch that chooses which worker serves.

Imports agent.base, agent.config and agent.routing; never store, transport, service, flows, ota,
app or cli.
"""
