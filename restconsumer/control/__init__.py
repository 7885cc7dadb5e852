"""The jobs across instances (SPEC §3, §6): where a job lives and who runs it.

:mod:`.store` keeps jobs, secrets and counters in Redis; :mod:`.supervisor` starts, updates
and rebuilds the runners of this instance's jobs; :mod:`.channel` hears the control
channel and reconciles with Redis; :mod:`.jobsdir` loads a jobs folder; :mod:`.watch`
notices it change; :mod:`.status` reports what each instance does; :mod:`.offsets` moves a
job's committed offsets.
"""
