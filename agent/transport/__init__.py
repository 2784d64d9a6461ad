"""Transport: MQTT. The only package that imports aiomqtt and paho.

Imports agent.base, agent.config and agent.routing; never store, inference, service, flows, ota,
app or cli.
"""
