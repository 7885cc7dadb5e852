"""The HTTP API and the dashboard (SPEC §7, §10): who talks to the service.

:mod:`.routes` (klein) serves the job API, the status, replays, previews and ``/ui``;
:mod:`.auth` checks tokens; :mod:`.server` runs the listening endpoint and drains it on
stop; :mod:`.preview` composes a job's requests without sending them. ``openapi.json`` is
the API's contract; ``ui/`` the dashboard's files.
"""
