"""The pipeline: bounded queue -> aggregator -> flusher (to storage)."""
