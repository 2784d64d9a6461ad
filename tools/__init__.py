"""Operator and developer tools: model maker, harness for real brokers and agents, demo."""
