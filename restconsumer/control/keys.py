"""Where the job store keeps things in Redis (SPEC §3, §6), and the Lua scripts that change
them: each change one script, so Redis applies it whole.

``job:{id}`` holds the stored job as JSON, the set ``list_jobs`` every id, ``stopped_jobs``
the stopped ones; ``job:{id}:set_offset``, ``:replay``, ``:stats`` and ``:instances`` a
move of offsets under way, a replay's mark, the counters and each instance's report; each
change is announced on ``msg/job:{id}``.
"""

from __future__ import annotations

__all__ = ["ADD_STATS", "BEGIN_MOVE", "CHANNEL_PATTERN", "CLAIM", "CREATE", "DELETE", "END_MOVE",
           "JOB_SET", "KEEP", "PUT", "PUT_STATES", "RELEASE", "REPLACE", "SET_STOPPED", "STOPPED_SET",
           "channel", "instances_key", "job_key", "offsets_key", "replay_key", "stats_key"]

JOB_SET = "list_jobs"
STOPPED_SET = "stopped_jobs"
CHANNEL_PATTERN = "msg/job:*"


def job_key(job_id: str) -> str:
    """The Redis key of a job."""
    return f"job:{job_id}"


def offsets_key(job_id: str) -> str:
    """The mark of a move of a job's offsets under way."""
    return f"job:{job_id}:set_offset"


def replay_key(job_id: str) -> str:
    """The mark of a replay of a job's dead letters under way."""
    return f"job:{job_id}:replay"


def stats_key(job_id: str) -> str:
    """A job's counters, added up by every instance."""
    return f"job:{job_id}:stats"


def instances_key(job_id: str) -> str:
    """What each instance last reported of a job."""
    return f"job:{job_id}:instances"


def channel(job_id: str) -> str:
    """The pub/sub channel on which changes to a job are announced."""
    return f"msg/job:{job_id}"


# Each change is one script, so Redis applies it whole (store, index, announce) even if
# the API request that made it is cut off half-way.
PUT = """
if ARGV[4] == '1' then redis.call('DEL', KEYS[3], KEYS[4]) end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'update')
return 1
"""
REPLACE = """
if redis.call('GET', KEYS[1]) ~= ARGV[4] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'update')
return 1
"""
CREATE = """
if redis.call('SETNX', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'update')
return 1
"""
DELETE = """
local removed = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6])
if removed == 1 then redis.call('PUBLISH', ARGV[2], 'delete') end
return removed
"""
SET_STOPPED = """
if ARGV[2] == '1' then redis.call('SADD', KEYS[1], ARGV[1]) else redis.call('SREM', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
BEGIN_MOVE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('PUBLISH', ARGV[3], 'set_offset')
return 1
"""
END_MOVE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], 'start')
return 1
"""

#: A mark held by one owner (ARGV[1]) for ARGV[2] seconds: taken if free, kept and
#: released only by its owner.
CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then return 1 end
return 0
"""
KEEP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

#: Each instance report (ARGV[2..]) into its job's hash (KEYS) under the instance's name
#: (ARGV[1]); the hash expires an hour after the last report.
PUT_STATES = """
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, ARGV[1], ARGV[i + 1])
  redis.call('EXPIRE', key, 3600)
end
return #KEYS
"""

# Checked before anything is added, so that the counters move all together or not at all
# (a script that fails half-way keeps what it had already written).
ADD_STATS = """
for i = 1, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current and not string.match(current, '^%-?%d+$') then
    return redis.error_reply('counter ' .. ARGV[i] .. ' of ' .. KEYS[1] .. ' is not a number')
  end
end
for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
