"""The data path's pure rules: payload checks, topic matching, prompts, windows of readings,
load shedding, and the bodies sent to the cloud (outbound).

No I/O. Imports only agent.base and agent.config.
"""
