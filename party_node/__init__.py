"""party_node."""
