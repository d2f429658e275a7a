"""edgeproxy: a custom-domain TLS edge for analytics products.

Customers point a hostname at the edge; the edge obtains a certificate over
ACME HTTP-01, terminates TLS by SNI, serves the vendor's tracker script
rewritten for that hostname, and forwards its API calls to the vendor's relay.
See README.md for the architecture and DESIGN notes for the module seams.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
