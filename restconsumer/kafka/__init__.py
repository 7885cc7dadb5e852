"""Kafka's side of a message's way (SPEC §5): fetching, committing, and the broker's health.

:mod:`.consumer` runs one job's confluent-kafka consumer on a thread of its own and speaks
to the job through a mailbox; :mod:`.health` probes the brokers; :mod:`.topics` creates the
topics the service writes to (replicated); :mod:`.fake` is an in-memory stand-in for
confluent-kafka's consumer and producer, for in-process tests.
"""
