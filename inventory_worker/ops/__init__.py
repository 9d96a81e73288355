"""Operator tools behind the CLI: audit (history, verify), prune, cache rebuild, dead letters."""
