"""Operator and developer tools: the demo, benchmarks, the model maker, chaos runs, installing."""
