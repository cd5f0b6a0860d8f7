"""Storage: the Redis key layout, atomic merge scripts, the store and the embedded launcher."""
