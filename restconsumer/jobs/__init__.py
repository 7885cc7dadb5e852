"""What a job is (SPEC §3, §4, §8, §12), plain data and functions, no Twisted.

:mod:`.model` validates a definition into a :class:`~restconsumer.jobs.model.Job`;
:mod:`.decode` reads a message (JSON, Avro containers, the Schema Registry's wire format);
:mod:`.mapping` turns a record into its request; :mod:`.work` does both for one message
(``prepare``, on the Kafka thread); :mod:`.secrets` resolves and redacts secret
references; :mod:`.signing` signs requests (Standard Webhooks).
"""
