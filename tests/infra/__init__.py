"""Real infrastructure for the integration tests: Kafka, Redis and the service itself."""
