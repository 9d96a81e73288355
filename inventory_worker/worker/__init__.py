"""The worker's loops: the consumer's batches, and the background duties (relay, sweeper, gauges)."""
