"""restconsumer: Kafka messages turned into REST requests, as declared by jobs kept in Redis.

The tree follows a message's way and the people who use the service; each package imports
only the ones below it (checked in CI by import-linter, ``pyproject.toml``):

- :mod:`restconsumer.tap` — the twistd plugin: wires everything below into one service.
- :mod:`restconsumer.ops` — running it: the ``restconsumer`` CLI, ``--embedded``, worker
  processes, logging.
- :mod:`restconsumer.api` — the HTTP API and the dashboard: routes, tokens, the server,
  previews, ``openapi.json``, ``ui/``.
- :mod:`restconsumer.control` — the jobs across instances: the Redis store, the supervisor
  that starts and rebuilds runners, the control channel, the jobs folder, status reports,
  offset moves.
- :mod:`restconsumer.delivery` — the core: a fetched batch → intake → dispatch → attempt →
  outcome → ledger → commit, with the HTTP sender, dead letters, OAuth2, the Schema
  Registry and the metrics.
- :mod:`restconsumer.kafka` — the Kafka loop on its own thread, the broker health probe, and
  an in-memory fake of confluent-kafka for tests.
- :mod:`restconsumer.jobs` — what a job is: its model and validation, the mapping from a
  record to a request, decoding, secrets, signing, and ``prepare`` (decode then map).
- :mod:`restconsumer.base` — value types every layer shares, thread services, ending the
  process.
"""

__version__ = "0.1.0"
