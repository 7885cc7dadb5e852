"""restconsumer: Kafka messages turned into REST requests, as declared by jobs kept in Redis."""

__version__ = "0.1.0"
