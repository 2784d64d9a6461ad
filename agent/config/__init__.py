"""The configuration: the TOML file and its sections, the [[routes]] entries, environment
overrides, and what a SIGHUP may change.

Owns `Settings`. Imports only agent.base.
"""
