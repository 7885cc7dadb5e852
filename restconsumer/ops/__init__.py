"""Running the service (SPEC §2, §9): what an operator starts and reads.

:mod:`.cli` is the ``restconsumer`` command, a client of the HTTP API; :mod:`.embedded`
the ``--embedded`` trial (an in-process broker, a demo feed and sink); :mod:`.workers` the
``--workers`` processes; :mod:`.logs` the log format.
"""
