"""The public data path: hot, async, no blocking I/O on the event loop.

The ASGI app (host gate, route table, handlers), the script cache, the relay
client and the spool that decorates it, certificates by SNI and the TLS policy.
"""
