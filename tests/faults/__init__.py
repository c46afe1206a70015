"""Fault tests: each guarantee of docs/guarantees.md, checked with a real fault."""
