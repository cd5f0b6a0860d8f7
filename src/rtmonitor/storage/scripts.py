"""Lua scripts that merge one flush into Redis atomically and idempotently.

Atomic: a script runs whole inside Redis, so instances writing the same device never
overwrite each other; compare-then-write fields (min, max, last) are exact only this way.
Idempotent: an instance commits its flushes in sequence order, and a script that finds its
marker key at this flush's sequence number or later returns 0, so a retried flush (a lost
reply, a reconnect, a journal replayed for a dead instance) is never counted twice. The
markers are bounded (one per instance and group), whatever the number of flushes.
"""

# The marker check shared by the merge scripts. KEYS[1] holds the highest flush sequence
# number of this instance applied to this group; ARGV[1] is its TTL, ARGV[2] this flush's seq.
# One instance commits its flushes strictly in order (and recovery replays them in order),
# so "already at or past this seq" means "this call was applied".
_MARKER = """
local applied = tonumber(redis.call('GET', KEYS[1]))
if applied ~= nil and applied >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
"""

# KEYS[1]   marker (same hash slot as every device key of this call)
# KEYS[2..] per device: its hash, then its rate buckets (pairs)
# ARGV[1]   marker TTL in seconds, ARGV[2] flush seq, ARGV[3] retention in ms (0: keep
#           forever); then, per device in KEYS order:
#   packets, bytes, first_seen, last_seen, nkinds, (kind, count) * nkinds,
#   nvalues, (name, count, sum, min, max, last, last_ts) * nvalues
# Numbers arrive as the client's exact decimal strings and are stored as such: comparing
# with tonumber() is exact for doubles, while Lua's tostring() would round to 14 digits.
MERGE_DEVICES = (
    _MARKER
    + """
local retention = tonumber(ARGV[3])
local i = 4
for k = 2, #KEYS, 2 do
  local key = KEYS[k]
  redis.call('HINCRBY', key, 'packets', ARGV[i])
  redis.call('HINCRBY', key, 'bytes', ARGV[i + 1])
  -- rate buckets: packets and bytes per second of receive time (keys.py)
  local rkey = KEYS[k + 1]
  local sec = math.floor(tonumber(ARGV[i + 3]) / 1000)
  redis.call('HINCRBY', rkey, sec, ARGV[i])
  redis.call('HINCRBY', rkey, sec .. 'b', ARGV[i + 1])
  redis.call('EXPIRE', rkey, 120)
  if redis.call('HLEN', rkey) > 240 then
    -- amortised pruning: about once a minute per busy device, keep the last 61 seconds
    for _, f in ipairs(redis.call('HKEYS', rkey)) do
      if tonumber((string.gsub(f, 'b', ''))) < sec - 61 then
        redis.call('HDEL', rkey, f)
      end
    end
  end
  local cur = tonumber(redis.call('HGET', key, 'first_seen'))
  if cur == nil or tonumber(ARGV[i + 2]) < cur then
    redis.call('HSET', key, 'first_seen', ARGV[i + 2])
  end
  cur = tonumber(redis.call('HGET', key, 'last_seen'))
  if cur == nil or tonumber(ARGV[i + 3]) > cur then
    redis.call('HSET', key, 'last_seen', ARGV[i + 3])
  end
  local nkinds = tonumber(ARGV[i + 4])
  i = i + 5
  for _ = 1, nkinds do
    redis.call('HINCRBY', key, 'k:' .. ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  local nvalues = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, nvalues do
    local p = 'v:' .. ARGV[i] .. ':'
    local n = redis.call('HINCRBY', key, p .. 'n', ARGV[i + 1])
    -- The sum is added as a double and kept with 17 significant digits, so it round-trips
    -- exactly (HINCRBYFLOAT keeps 17 decimal places, and refuses a result that overflows).
    -- A sum that leaves the range of a double becomes inf, -inf or nan and stays so: the
    -- reads report it as an overflow. A count without a sum (written before this script
    -- by an HINCRBYFLOAT that overflowed) stays unknown rather than restart from zero.
    local sum = redis.call('HGET', key, p .. 'sum')
    if sum then
      sum = tonumber(sum) + tonumber(ARGV[i + 2])
    elseif n == tonumber(ARGV[i + 1]) then
      sum = tonumber(ARGV[i + 2])
    else
      sum = 0 / 0
    end
    redis.call('HSET', key, p .. 'sum', string.format('%.17g', sum))
    cur = tonumber(redis.call('HGET', key, p .. 'min'))
    if cur == nil or tonumber(ARGV[i + 3]) < cur then
      redis.call('HSET', key, p .. 'min', ARGV[i + 3])
    end
    cur = tonumber(redis.call('HGET', key, p .. 'max'))
    if cur == nil or tonumber(ARGV[i + 4]) > cur then
      redis.call('HSET', key, p .. 'max', ARGV[i + 4])
    end
    cur = tonumber(redis.call('HGET', key, p .. 'ts'))
    if cur == nil or tonumber(ARGV[i + 6]) >= cur then
      redis.call('HSET', key, p .. 'last', ARGV[i + 5], p .. 'ts', ARGV[i + 6])
    end
    i = i + 7
  end
  if retention > 0 then
    -- after the writes (PEXPIRE on a key not yet created is a no-op): a device silent
    -- for the retention expires with everything it counted
    redis.call('PEXPIRE', key, retention)
  end
end
return 1
"""
)

# KEYS: marker, totals, rejected, devices, idx:packets, idx:bytes, idx:last_seen, rate,
#       rate window (absent from journals written before it existed)
# ARGV: TTL, seq, packets, bytes, second, nrejected, (reason, count) * nrejected,
#       (device, packets, bytes, last_seen) * rest
MERGE_GLOBAL = (
    _MARKER
    + """
redis.call('HINCRBY', KEYS[2], 'packets', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[4])
local sec = tonumber(ARGV[5])
redis.call('HINCRBY', KEYS[8], sec, ARGV[3])
redis.call('HINCRBY', KEYS[8], sec .. 'b', ARGV[4])
redis.call('EXPIRE', KEYS[8], 120)
if redis.call('HLEN', KEYS[8]) > 240 then
  for _, f in ipairs(redis.call('HKEYS', KEYS[8])) do
    if tonumber((string.gsub(f, 'b', ''))) < sec - 61 then
      redis.call('HDEL', KEYS[8], f)
    end
  end
end
local nrejected = tonumber(ARGV[6])
local i = 7
for _ = 1, nrejected do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  local dev = ARGV[i]
  redis.call('ZADD', KEYS[4], 'NX', 0, dev)
  redis.call('ZINCRBY', KEYS[5], ARGV[i + 1], dev)
  redis.call('ZINCRBY', KEYS[6], ARGV[i + 2], dev)
  redis.call('ZADD', KEYS[7], 'GT', ARGV[i + 3], dev)
  if KEYS[9] then
    redis.call('ZINCRBY', KEYS[9], ARGV[i + 1], dev)
  end
  i = i + 4
end
if KEYS[9] then
  -- written during its 10 s, read during the next 10 s: 30 s after the last write is enough
  redis.call('EXPIRE', KEYS[9], 30)
end
return 1
"""
)

# Exactly-once, step 1 of 3 (all keys share the {prefix} hash slot).
# KEYS: journal, journal index, batch-id keys...; ARGV: flush id, now ms, journal blob.
# Claims every batch id for this flush and stores the flush's journal, atomically — or,
# if any batch id is already taken by another flush, writes nothing and returns the
# conflicts as a flat list {position, state, ...} (state "c" = committed, "p:<flush>" =
# pending in another flush). A retry of the same flush finds its own claims and goes on.
PREPARE = """
local mine = 'p:' .. ARGV[1]
local conflicts = {}
for i = 3, #KEYS do
  local state = redis.call('GET', KEYS[i])
  if state and state ~= mine then
    table.insert(conflicts, i - 2)
    table.insert(conflicts, state)
  end
end
if #conflicts > 0 then
  return conflicts
end
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], mine)
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return conflicts
"""

# Exactly-once, step 3 of 3 (after every merge call of the journal was applied).
# KEYS: journal, journal index, batch-id keys...; ARGV: flush id, dedupe window seconds.
# The batch ids become "committed" for the dedupe window; the journal is dropped.
FINALIZE = """
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], 'c', 'EX', ARGV[2])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# One device's hash and rate buckets in one call (KEYS: the two). A read that needs no Lua,
# but one command instead of a pipeline: see RedisStore.get_devices.
READ_DEVICE = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""
