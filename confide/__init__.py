"""Confide: shared pieces of the platform (settings, errors, identity, transport, CLI).

The product packages are `party_node`, `coordinator`, `psi`, `federated` and `consent`;
this package only holds what all of them need, and the one `confide` command.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
