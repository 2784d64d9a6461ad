"""The command line: `edge-agent run`, `check-config`, `status`, `queue` and `model ...`, and the
checks run before the agent touches anything.

The top: may import every other package; nothing imports it.
"""
