"""The store: the one SQLite owner. Its writer thread, schema and upgrades, transactions,
quarantine of a corrupt file, the drain's reserve and the read-only views.

Translates every sqlite3 error at its edge. Imports agent.base, agent.config and agent.routing;
never transport, inference, service, flows, ota, app or cli.
"""
