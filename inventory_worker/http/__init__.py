"""The read-only HTTP API: routes, auth, rate limit, the server that runs it."""
