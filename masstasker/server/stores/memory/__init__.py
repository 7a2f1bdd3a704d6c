"""The in-memory store: every task in this process, optionally logged to a data directory."""
