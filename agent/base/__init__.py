"""The base: errors, records, retry pacing, waits, liveness, durable writes, digests, output
validation and signatures. Each module needs the standard library or one library at most.

Owns nothing stateful. Must not import any other agent package.
"""
