"""The edge gateway daemon (arrives with the edge issue)."""
