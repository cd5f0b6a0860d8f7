"""Lua scripts that merge one flush into Redis atomically and idempotently.

Atomic: a script runs whole inside Redis, so instances writing the same device never
overwrite each other; compare-then-write fields (min, max, last) are exact only this way.
Idempotent: an instance commits its flushes in sequence order, and a script that finds its
marker key at this flush's sequence number or later merges nothing (the device script
returns the records' figures as they are, for the sorted indexes), so a retried flush (a
lost reply, a reconnect, a journal replayed for a dead instance) is never counted twice.
The markers are bounded (one per instance and group), whatever the number of flushes.
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

# A device's record (one string key, keys.py) and its delta in a flush are packed binary
# (Redis' Lua `struct`, little-endian), so a merge is one GET and one SET whatever the
# device sends, and no number is parsed from text:
#   record  <ddddddHHH  packets, bytes, first_seen, last_seen (receive times, ms), the
#                       newest aligned 10-second window it was counted in (sort=rate),
#                       its packets in that window, nkinds, nvalues, nbuckets
#           then (s d) * nkinds              kind, count
#                (s dddddd) * nvalues        name, count, sum, min, max, last, last_ts
#                (I4 dd) * nbuckets          receive second, packets, bytes (last ~61 s)
#   delta   <ddddHH     packets, bytes, first_seen, last_seen, nkinds, nvalues
#           then (s d) * nkinds, (s dddddd) * nvalues, as in the record
# ("s" is a zero-terminated string: ids and names never hold a zero byte, model.ID_CHARS.)
# Numbers are doubles (counts exact up to 2^53), so sums, minima and maxima keep every
# bit; a sum that leaves the range of a double becomes inf, -inf or nan and stays so (the
# reads report an overflow).
_RECORD = """
local HEAD = '<ddddddHHH'
local formats, wholes = {}, {}
local function body(nk, nv, nb)
  local key = (nk * 65536 + nv) * 65536 + nb  -- each < 2^16 (H), exact in a double
  local f = formats[key]
  if not f then
    f = '<' .. string.rep('sd', nk) .. string.rep('sdddddd', nv) .. string.rep('I4dd', nb)
    formats[key] = f
  end
  return f
end
-- a whole record: HEAD, then body()
local function whole(nk, nv, nb)
  local key = (nk * 65536 + nv) * 65536 + nb
  local f = wholes[key]
  if not f then
    f = HEAD .. string.sub(body(nk, nv, nb), 2)
    wholes[key] = f
  end
  return f
end
"""

# KEYS[1]   marker (same hash slot as every device key of this call)
# KEYS[2..] on a single Redis (ARGV[6] = 5): the device index, the packets, bytes and
#           last_seen indexes and the sort=rate window ARGV[4] of the devices' index group;
#           then the devices' records (keys.py KeyLayout.device: the id is read back from
#           each, after ARGV[7] bytes and before the closing brace)
# ARGV[1]   marker TTL in seconds, ARGV[2] flush seq, ARGV[3] retention in ms (0: keep
#           forever), ARGV[4] this flush's rate window, ARGV[5] the devices' deltas, packed
#           one after the other in KEYS order, ARGV[6] index keys (0 or 5), ARGV[7] as above
# With index keys, the script writes the devices' index entries itself (bulk ZADDs, the same
# rules as RedisStore._index_commands) and returns the number of devices. Without (a
# cluster: the indexes live in other slots), it returns, per device, 5 integers for them:
#   packets, bytes, last_seen, packets in ARGV[4]'s window (0: none), and 1 if this call
#   created the record, 0 if not, 2 if the call had been applied before (the records as
#   they are now), -1 if so and the record has expired since (nothing to index).
MERGE_DEVICES = (
    _RECORD
    + """
local window = tonumber(ARGV[4])
local retention = tonumber(ARGV[3])
local ni = tonumber(ARGV[6] or '0')
local id_at = tonumber(ARGV[7] or '0')
local out = {}
-- index entries: devices (NX), packets and bytes (GT, or replacing for a record created
-- anew while retention is on: its predecessor's entries may be higher), last_seen (GT),
-- the rate window (GT)
local ix = {{}, {}, {}, {}, {}, {}, {}}
local function emit(key, p, b, l, wp, created)
  if ni == 0 then
    local n = #out
    out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = p, b, l, wp, created
    return
  end
  if created < 0 then return end
  local id = string.sub(key, id_at + 1, -2)
  local fresh = created == 1 and retention > 0
  local t
  -- a record that existed is in the device index since its creation (indexed by the same
  -- call), unless retention is on: then the expiry may have dropped it meanwhile
  if created ~= 0 or retention > 0 then t = ix[1]; t[#t + 1] = 0; t[#t + 1] = id end
  t = fresh and ix[3] or ix[2]; t[#t + 1] = p; t[#t + 1] = id
  t = fresh and ix[5] or ix[4]; t[#t + 1] = b; t[#t + 1] = id
  t = ix[6]; t[#t + 1] = l; t[#t + 1] = id
  if wp ~= 0 then t = ix[7]; t[#t + 1] = wp; t[#t + 1] = id end
end
local function zadd(key, flag, t)
  if #t == 0 then return end
  if flag then
    redis.call('ZADD', key, flag, unpack(t))
  else
    redis.call('ZADD', key, unpack(t))
  end
end
local function indexes()
  if ni == 0 then return out end
  zadd(KEYS[2], 'NX', ix[1])
  zadd(KEYS[3], 'GT', ix[2]); zadd(KEYS[3], nil, ix[3])
  zadd(KEYS[4], 'GT', ix[4]); zadd(KEYS[4], nil, ix[5])
  zadd(KEYS[5], 'GT', ix[6])
  if #ix[7] > 0 then
    zadd(KEYS[6], 'GT', ix[7])
    -- written during its 10 s, read during the next 10 s: 30 s after the last write
    redis.call('EXPIRE', KEYS[6], 30)
  end
  return #KEYS - 1 - ni
end
local applied = tonumber(redis.call('GET', KEYS[1]))
if applied ~= nil and applied >= tonumber(ARGV[2]) then
  -- a retry or a replay: nothing to merge, but the indexes may still need the figures
  for k = 2 + ni, #KEYS do
    local blob = redis.call('GET', KEYS[k])
    if blob then
      local p, b, _, l, w, wp = struct.unpack(HEAD, blob)
      if w ~= window then wp = 0 end
      emit(KEYS[k], p, b, l, wp, 2)
    else
      emit(KEYS[k], 0, 0, 0, 0, -1)
    end
  end
  return indexes()
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
local deltas = ARGV[5]
local at = 1
for k = 2 + ni, #KEYS do
  local key = KEYS[k]
  local packets, nbytes, first, last, dk, dv
  packets, nbytes, first, last, dk, dv, at = struct.unpack('<ddddHH', deltas, at)
  local d = {struct.unpack(body(dk, dv, 0), deltas, at)}
  at = d[#d]
  local blob = redis.call('GET', key)
  local p, b, f, l, w, wp, nk, nv, nb, r, created
  if blob then
    local pos
    p, b, f, l, w, wp, nk, nv, nb, pos = struct.unpack(HEAD, blob)
    r = {struct.unpack(body(nk, nv, nb), blob, pos)}
    r[#r] = nil
    p, b, created = p + packets, b + nbytes, 0
    if first < f then f = first end
    if last > l then l = last end
  else
    p, b, f, l, w, wp, nk, nv, nb, r, created = packets, nbytes, first, last, 0, 0, 0, 0, 0, {}, 1
  end
  -- kinds: r[1 .. 2 nk]
  local j = 1
  for _ = 1, dk do
    local name, found = d[j], nil
    for q = 1, 2 * nk, 2 do
      if r[q] == name then found = q; break end
    end
    if found then
      r[found + 1] = r[found + 1] + d[j + 1]
    else
      table.insert(r, 2 * nk + 1, name)
      table.insert(r, 2 * nk + 2, d[j + 1])
      nk = nk + 1
    end
    j = j + 2
  end
  -- values: r[2 nk + 1 .. 2 nk + 7 nv]
  local base = 2 * nk
  for _ = 1, dv do
    local name, found = d[j], nil
    for q = base + 1, base + 7 * nv, 7 do
      if r[q] == name then found = q; break end
    end
    if found then
      local q = found
      r[q + 1] = r[q + 1] + d[j + 1]
      r[q + 2] = r[q + 2] + d[j + 2]
      if d[j + 3] < r[q + 3] then r[q + 3] = d[j + 3] end
      if d[j + 4] > r[q + 4] then r[q + 4] = d[j + 4] end
      if d[j + 6] >= r[q + 6] then r[q + 5], r[q + 6] = d[j + 5], d[j + 6] end
    else
      for e = 0, 6 do table.insert(r, base + 7 * nv + 1 + e, d[j + e]) end
      nv = nv + 1
    end
    j = j + 7
  end
  -- rate buckets: packets and bytes per second of receive time; keep the last 61 seconds
  local start = 2 * nk + 7 * nv
  local sec = math.floor(last / 1000)
  local found, stale = false, false
  for q = start + 1, start + 3 * nb, 3 do
    if r[q] == sec then
      r[q + 1], r[q + 2], found = r[q + 1] + packets, r[q + 2] + nbytes, true
    elseif r[q] < sec - 61 then
      stale = true
    end
  end
  if not found then
    local n = start + 3 * nb
    r[n + 1], r[n + 2], r[n + 3], nb = sec, packets, nbytes, nb + 1
  end
  if stale then
    local to, kept = start, 0
    for q = start + 1, start + 3 * nb, 3 do
      if r[q] >= sec - 61 then
        r[to + 1], r[to + 2], r[to + 3] = r[q], r[q + 1], r[q + 2]
        to, kept = to + 3, kept + 1
      end
    end
    for q = start + 3 * nb, to + 1, -1 do r[q] = nil end
    nb = kept
  end
  -- sort=rate: the packets of this flush's window, added up over flushes and instances
  if window == w then
    wp = wp + packets
  elseif window > w then
    w, wp = window, packets
  end
  local record = struct.pack(whole(nk, nv, nb), p, b, f, l, w, wp, nk, nv, nb, unpack(r))
  if retention > 0 then
    -- a device silent for the retention expires with everything it counted
    redis.call('SET', key, record, 'PX', retention)
  else
    redis.call('SET', key, record)
  end
  if w ~= window then wp = 0 end
  emit(key, p, b, l, wp, created)
end
return indexes()
"""
)

# KEYS: marker, totals, rejected, rate
# ARGV: TTL, seq, packets, bytes, second, nrejected, (reason, count) * nrejected
# Per flush, not per device: the sorted indexes are written by plain bulk ZADDs after the
# device calls, from their replies (RedisStore._index_commands).
MERGE_GLOBAL = (
    _MARKER
    + """
redis.call('HINCRBY', KEYS[2], 'packets', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[4])
local sec = tonumber(ARGV[5])
redis.call('HINCRBY', KEYS[4], sec, ARGV[3])
redis.call('HINCRBY', KEYS[4], sec .. 'b', ARGV[4])
redis.call('EXPIRE', KEYS[4], 120)
if redis.call('HLEN', KEYS[4]) > 240 then
  for _, f in ipairs(redis.call('HKEYS', KEYS[4])) do
    if tonumber((string.gsub(f, 'b', ''))) < sec - 61 then
      redis.call('HDEL', KEYS[4], f)
    end
  end
end
local nrejected = tonumber(ARGV[6])
local i = 7
for _ = 1, nrejected do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
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

# The records of KEYS (any number, one hash slot in a cluster) for the reads: per key an
# empty array (no such device) or its fields flat, integers as integers and doubles as
# 17-digit strings (a Lua number in a reply would be truncated to an integer):
#   packets, bytes, first_seen, last_seen, nkinds, (kind, count) * nkinds,
#   nvalues, (name, count, sum, min, max, last, last_ts) * nvalues,
#   (second, packets, bytes) * the rest
READ_DEVICES = (
    _RECORD
    + """
local out = {}
for k = 1, #KEYS do
  local blob = redis.call('GET', KEYS[k])
  local f = {}
  if blob then
    local p, b, first, last, _, _, nk, nv, nb, pos = struct.unpack(HEAD, blob)
    local r = {struct.unpack(body(nk, nv, nb), blob, pos)}
    f[1], f[2], f[3], f[4], f[5] = p, b, first, last, nk
    for j = 1, 2 * nk do f[#f + 1] = r[j] end
    f[#f + 1] = nv
    for j = 2 * nk + 1, 2 * nk + 7 * nv, 7 do
      f[#f + 1] = r[j]; f[#f + 1] = r[j + 1]
      f[#f + 1] = string.format('%.17g', r[j + 2])
      f[#f + 1] = string.format('%.17g', r[j + 3])
      f[#f + 1] = string.format('%.17g', r[j + 4])
      f[#f + 1] = string.format('%.17g', r[j + 5])
      f[#f + 1] = r[j + 6]
    end
    for j = 2 * nk + 7 * nv + 1, 2 * nk + 7 * nv + 3 * nb do f[#f + 1] = r[j] end
  end
  out[k] = f
end
return out
"""
)
