"""Lua scripts that merge one flush into Redis atomically and idempotently.

Atomic: a script runs whole inside Redis, so instances writing the same device never
overwrite each other; compare-then-write fields (min, max, last) are exact only this way.
Idempotent: an instance commits its flushes in sequence order, and a script that finds its
marker key at this flush's sequence number or later merges nothing (the device script
returns the records' figures as they are, for the index columns), so a retried flush (a
lost reply, a reconnect, a journal replayed for a dead instance) is never counted twice.
The markers are bounded (one per instance and group), whatever the number of flushes.
"""

from rtmonitor.model import RECORD_NAMES_MAX, RECORD_VALUES_MAX
from rtmonitor.storage.keys import IX_WRONGTYPE, MAX_SLOTS

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
#   record  <ddddddHHHH packets, bytes, first_seen, last_seen (receive times, ms), the
#                       newest aligned 10-second window it was counted in (sort=rate),
#                       its packets in that window, nkinds, nvalues, nseconds, nspans
#           then (s d) * nkinds              kind, count
#                (s dddddd) * nvalues        name, count, sum, min, max, last, last_ts
#                (I4 dd) * nseconds          receive second, packets, bytes: the newest
#                                            FINE_S + 1 seconds (the 10 s window's)
#                (I4 dd) * nspans            the same for aligned 10-second spans: older
#                                            seconds folded in, dropped after 61 s
#           (layout 4; layout 2 kept up to 61 one-second buckets: ~1.2 KB per device that
#           sends every second, and as much to unpack and pack at each merge)
#   delta   <ddddHH     packets, bytes, first_seen, last_seen, nkinds, nvalues
#           then (s d) * nkinds, (s dddddd) * nvalues, as in the record
# ("s" is a zero-terminated string: ids and names never hold a zero byte, model.ID_CHARS.)
# Numbers are doubles (counts exact up to 2^53), so sums, minima and maxima keep every
# bit; a sum that leaves the range of a double becomes inf, -inf or nan and stays so (the
# reads report an overflow).
_RECORD = """
local HEAD = '<ddddddHHHH'
local formats, wholes = {}, {}
-- (nk, nv < 2^16; nseconds + nspans < 2^16: the key is exact in a double)
local function body(nk, nv, nb)
  local key = (nk * 65536 + nv) * 65536 + nb
  local f = formats[key]
  if not f then
    f = '<' .. string.rep('sd', nk) .. string.rep('sdddddd', nv) .. string.rep('I4dd', nb)
    formats[key] = f
  end
  return f
end
-- a whole record: HEAD, then body() with its seconds and spans (nb = nf + nc)
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

# Refusals of a record the merge cannot take (the rtm module's words too, _merge.c).
_CUT_SHORT = "ERR a device record is cut short (not written by this layout?)"
_TOO_BIG = (
    "ERR a device record holds more kinds and values than a merge takes (not written by "
    "this layout?)"
)

# KEYS[1]   marker (same hash slot as every device key of this call)
# KEYS[2..] the devices' records
# ARGV[1]   marker TTL in seconds, ARGV[2] flush seq, ARGV[3] retention in ms (0: keep
#           forever), ARGV[4] this flush's rate window, ARGV[5] the devices' deltas, packed
#           one after the other in KEYS order
# Returns, per device, 6 integers for the index group (WRITE_ROWS, after this call):
#   packets, bytes, last_seen, packets in ARGV[4]'s window (0: none), and 1 if this call
#   created the record, 0 if not, 2 if the call had been applied before (the records as
#   they are now), -1 if so and the record has expired since (nothing to index), and the
#   record's first_seen; then, last, how many kinds, value names and rate buckets the
#   records had no room for (below).
# A record never outgrows what one Lua call unpacks (RECORD_VALUES_MAX values), whatever
# its device sends: a merge that failed for it would fail at every retry, and the flush
# (every device in it) with it. Kinds and value names take at most NAME_ROOM values, and a
# new one past it is not recorded (its packets still count in the record's packets and
# bytes); the rate buckets take the rest (>= 40, where a device keeps ~18; past it the
# record's first, oldest, spans go, then its first seconds). One instance's per-device limits fit in
# NAME_ROOM (config.py); several instances, or one restarted, each admit a device's names
# anew, which is how a record can reach it. The rtm module does the same (_merge.c).
# (The index group's columns are written by WRITE_ROWS, a second call: on a Redis Cluster
# the group's keys and the devices' keys live in different hash slots. The rtm module,
# storage/_merge.c, writes them in the same command.)
MERGE_DEVICES = (
    _RECORD
    + f"local MAX_VALUES, NAME_ROOM = {RECORD_VALUES_MAX}, {RECORD_NAMES_MAX}\n"
    + f"local CUT_SHORT, TOO_BIG = '{_CUT_SHORT}', '{_TOO_BIG}'\n"
    + """
local window = tonumber(ARGV[4])
local retention = tonumber(ARGV[3])
local out, dropped = {}, 0
local function emit(p, b, l, wp, created, f)
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] = p, b, l, wp, created, f
end
local applied = tonumber(redis.call('GET', KEYS[1]))
if applied ~= nil and applied >= tonumber(ARGV[2]) then
  -- a retry or a replay: nothing to merge, but the indexes may still need the figures
  for k = 2, #KEYS do
    local blob = redis.call('GET', KEYS[k])
    if blob then
      local p, b, f, l, w, wp = struct.unpack(HEAD, blob)
      if w ~= window then wp = 0 end
      emit(p, b, l, wp, 2, f)
    else
      emit(0, 0, 0, 0, -1, 0)
    end
  end
  out[#out + 1] = 0
  return out
end
-- Every record is read and checked before anything is written, so that a call is refused
-- whole, as the rtm module's is, never after some of its devices were merged (a retry
-- would find the marker set and skip the others): a key of another type, a record shorter
-- than its head says, or one holding more than a merge takes (none of them written by
-- this). Only the head and the length are checked here (unpacking whole records up front,
-- and keeping them, cost ~20% more Redis CPU per merge): a record of the right length
-- whose names lack their zero bytes still fails below; the module checks those too.
local blobs = {}
for k = 2, #KEYS do
  local blob = redis.pcall('GET', KEYS[k])
  if type(blob) == 'table' then return blob end  -- WRONGTYPE, as Redis says it
  if blob then
    local ok, _, _, _, _, _, _, nk, nv, nf, nc = pcall(struct.unpack, HEAD, blob)
    -- (the head is 56 bytes; a kind at least 1 + 8, a value name 1 + 48, a bucket 20)
    if not ok or #blob < 56 + 9 * nk + 49 * nv + 20 * (nf + nc) then
      return redis.error_reply(CUT_SHORT)
    end
    local names = 2 * nk + 7 * nv
    if names + 3 > MAX_VALUES or names + 3 * (nf + nc) > MAX_VALUES then
      return redis.error_reply(TOO_BIG)
    end
  end
  blobs[k] = blob
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
-- Rate buckets (the record's seconds and spans, from r[base + 1] on): add this delta's
-- packets and bytes to its newest receive second `sec`; fold seconds older than the last
-- FINE_S + 1 into their aligned 10-second span, and drop spans that ended over 61 s ago
-- (only when a second is folded: a silent device's record is not written anyway). In
-- place, as most merges only add to a second. Returns the new counts of seconds and spans.
local FINE_S = 10
local function buckets(r, base, nf, nc, sec, packets, nbytes)
  local fold_before = sec - FINE_S
  local stop = base + 3 * nf
  local found, stale = false, false
  for q = base + 1, stop, 3 do
    local s = r[q]
    if s == sec then
      r[q + 1], r[q + 2], found = r[q + 1] + packets, r[q + 2] + nbytes, true
    elseif s < fold_before then
      stale = true
    end
  end
  if not found then  -- a new second, after the others: the spans move up by one
    for q = stop + 3 * nc, stop + 1, -1 do r[q + 3] = r[q] end
    r[stop + 1], r[stop + 2], r[stop + 3] = sec, packets, nbytes
    nf, stop = nf + 1, stop + 3
  end
  if not stale then return nf, nc end
  local last = stop + 3 * nc
  local folded, to = {}, base
  for q = base + 1, stop, 3 do  -- keep the newest seconds, take out the others
    local s = r[q]
    if s < fold_before then
      local n = #folded
      folded[n + 1], folded[n + 2], folded[n + 3] = s - s % 10, r[q + 1], r[q + 2]
    else
      r[to + 1], r[to + 2], r[to + 3], to = s, r[q + 1], r[q + 2], to + 3
    end
  end
  local drop_before, sp = sec - 61, to
  for q = stop + 1, last, 3 do  -- the spans, after the seconds kept
    if r[q] + 10 > drop_before then
      r[sp + 1], r[sp + 2], r[sp + 3], sp = r[q], r[q + 1], r[q + 2], sp + 3
    end
  end
  for i = 1, #folded, 3 do
    local c = folded[i]
    if c + 10 > drop_before then
      local hit = false
      for q = to + 1, sp, 3 do
        if r[q] == c then
          r[q + 1], r[q + 2], hit = r[q + 1] + folded[i + 1], r[q + 2] + folded[i + 2], true
          break
        end
      end
      if not hit then
        r[sp + 1], r[sp + 2], r[sp + 3], sp = c, folded[i + 1], folded[i + 2], sp + 3
      end
    end
  end
  for q = last, sp + 1, -1 do r[q] = nil end
  return (to - base) / 3, (sp - to) / 3
end
local deltas = ARGV[5]
local at = 1
for k = 2, #KEYS do
  local key = KEYS[k]
  local packets, nbytes, first, last, dk, dv
  packets, nbytes, first, last, dk, dv, at = struct.unpack('<ddddHH', deltas, at)
  local d = {struct.unpack(body(dk, dv, 0), deltas, at)}
  at = d[#d]
  local blob = blobs[k]
  local p, b, f, l, w, wp, nk, nv, nf, nc, r, created
  if blob then
    local pos
    p, b, f, l, w, wp, nk, nv, nf, nc, pos = struct.unpack(HEAD, blob)
    r = {struct.unpack(body(nk, nv, nf + nc), blob, pos)}
    r[#r] = nil
    p, b, created = p + packets, b + nbytes, 0
    if first < f then f = first end
    if last > l then l = last end
  else
    p, b, f, l, w, wp, nk, nv, nf, nc, r, created =
      packets, nbytes, first, last, 0, 0, 0, 0, 0, 0, {}, 1
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
    elseif 2 * (nk + 1) + 7 * nv <= NAME_ROOM then
      table.insert(r, 2 * nk + 1, name)
      table.insert(r, 2 * nk + 2, d[j + 1])
      nk = nk + 1
    else
      dropped = dropped + 1
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
    elseif 2 * nk + 7 * (nv + 1) <= NAME_ROOM then
      for e = 0, 6 do table.insert(r, base + 7 * nv + 1 + e, d[j + e]) end
      nv = nv + 1
    else
      dropped = dropped + 1
    end
    j = j + 7
  end
  local names = 2 * nk + 7 * nv
  nf, nc = buckets(r, names, nf, nc, math.floor(last / 1000), packets, nbytes)
  local room = math.floor((MAX_VALUES - names) / 3)
  if nf + nc > room then  -- the first (oldest) spans, then the first seconds
    local excess = nf + nc - room
    local spans = math.min(excess, nc)
    local seconds = excess - spans
    local to = names
    for q = names + 3 * seconds + 1, names + 3 * nf do
      to = to + 1
      r[to] = r[q]
    end
    for q = names + 3 * (nf + spans) + 1, names + 3 * (nf + nc) do
      to = to + 1
      r[to] = r[q]
    end
    for q = #r, to + 1, -1 do r[q] = nil end
    nf, nc, dropped = nf - seconds, nc - spans, dropped + excess
  end
  -- sort=rate: the packets of this flush's window, added up over flushes and instances
  if window == w then
    wp = wp + packets
  elseif window > w then
    w, wp = window, packets
  end
  local record = struct.pack(whole(nk, nv, nf + nc), p, b, f, l, w, wp, nk, nv, nf, nc, unpack(r))
  if retention > 0 then
    -- a device silent for the retention expires with everything it counted
    redis.call('SET', key, record, 'PX', ARGV[3])
  else
    redis.call('SET', key, record)
  end
  if w ~= window then wp = 0 end
  emit(p, b, l, wp, created, f)
end
out[#out + 1] = dropped
return out
"""
)

# A number for redis.call as the integer it is: Redis 7.2.0-7.2.4 sent some integral Lua
# numbers in exponent form (100000000 as 1e+08), which an offset or an integer argument
# refuses (redis/redis#13113). ARGV's own strings go as they came.
_INT = """
local function int(x) return string.format('%d', x) end
"""

# An index group's columns (keys.py) brought up to a device call's reply: what the rtm
# module does after each device's merge, byte for byte (tests/integration/
# test_merge_module.py), for a Redis without it and for a Redis Cluster (the group's keys
# share its tag, the devices' keys do not: a second call).
# KEYS: devices, slot, id, free, c:packets, c:bytes, c:last_seen, c:rate (KeyLayout.group_keys)
# ARGV: the call's window, then per device: id, packets, bytes, last_seen, packets in the
#       window, created, first_seen (MERGE_DEVICES' reply: created -1 skips the device)
# A device takes a slot if it has none: a freed one (ix-free, its head first), else the
# next. Only something else writes a slot that is not a number, or a freed slot that is
# not one or is in use: such a device takes a new slot, such an entry is dropped, rather
# than the call failing once the records are merged. Figures only grow, so the highest
# reported is kept (a retry, a replay or another instance's older reply changes nothing),
# except over a row last seen before the replying record's first packet: that row is an
# expired predecessor's (retention), and the record now replying is a new one.
WRITE_ROWS = (
    f"local MAX_SLOTS, IX_WRONGTYPE = {MAX_SLOTS}, '{IX_WRONGTYPE}'\n"
    + _INT
    + """
local kinds = {'zset', 'hash', 'hash', 'list', 'string', 'string', 'string', 'string'}
for i = 1, 8 do
  local t = redis.call('TYPE', KEYS[i]).ok
  if t ~= 'none' and t ~= kinds[i] then
    return redis.error_reply(IX_WRONGTYPE)
  end
end
local window = tonumber(ARGV[1])
local nxt = math.floor(redis.call('STRLEN', KEYS[8]) / 32)
local function slot_number(text)
  if text == '0' or string.match(text, '^[1-9]%d*$') then
    local n = tonumber(text)
    if n < MAX_SLOTS then return n end
  end
  return nil
end
-- the devices to write (created -1: a replay, the record has expired since: none)
local dev = {}
for i = 2, #ARGV, 7 do
  if tonumber(ARGV[i + 5]) >= 0 then dev[#dev + 1] = i end
end
-- (a slot for every device, even if none had one: refused before anything is written)
if nxt + (#ARGV - 1) / 7 > MAX_SLOTS then
  return redis.error_reply('ERR an index group has no slot left')
end
if #dev == 0 then return 0 end
local ids = {}
for k, i in ipairs(dev) do ids[k] = ARGV[i] end
local have = redis.call('HMGET', KEYS[2], unpack(ids))
-- slots in the devices' order (the module's)
local slot, fresh = {}, {}
for k = 1, #dev do
  local s = have[k] and slot_number(have[k])
  if s then
    slot[k], fresh[k] = s, false
  else
    s = nil
    while true do
      local freed = redis.call('LPOP', KEYS[4])
      if not freed then break end
      local n = slot_number(freed)
      -- (a slot past the columns was never used, so never freed)
      if n and n < nxt and redis.call('HEXISTS', KEYS[3], freed) == 0 then
        s = n
        break
      end
    end
    if s == nil then s = nxt end
    if s >= nxt then nxt = s + 1 end
    slot[k], fresh[k] = s, true
    -- (a device has a slot exactly while it is in the devices set)
    redis.call('ZADD', KEYS[1], 'NX', 0, ids[k])
    redis.call('HSET', KEYS[2], ids[k], s)
    redis.call('HSET', KEYS[3], s, ids[k])
  end
end
-- Packets, bytes and last_seen: one BITFIELD per column reads the call's rows and one
-- writes them (big-endian i64s; 0 past the end). Offsets and figures go as the strings
-- they came in where they can: formatting a Lua number for Redis costs more than the rest.
local at = {}
for k = 1, #dev do
  at[k] = '#' .. (fresh[k] and slot[k] or have[k])
end
local function read(key)
  local ops = {}
  for k = 1, #dev do
    ops[#ops + 1] = 'GET'
    ops[#ops + 1] = 'i64'
    ops[#ops + 1] = at[k]
  end
  return redis.call('BITFIELD', KEYS[key], unpack(ops))
end
local op, ob, ol = read(5), read(6), read(7)
local sp, sb, sl = {}, {}, {}
local function set(ops, k, v)
  ops[#ops + 1] = 'SET'
  ops[#ops + 1] = 'i64'
  ops[#ops + 1] = at[k]
  ops[#ops + 1] = v
end
for k, i in ipairs(dev) do
  local s = slot[k]
  local p, b, l = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local reset = fresh[k] or (ol[k] > 0 and tonumber(ARGV[i + 6]) > ol[k])
  if not reset and op[k] > tonumber(p) then p = int(op[k]) end
  if not reset and ob[k] > tonumber(b) then b = int(ob[k]) end
  if not reset and ol[k] > tonumber(l) then l = int(ol[k]) end
  set(sp, k, p)
  set(sb, k, b)
  set(sl, k, l)
  -- the rate row: 4 i64s, read and written whole
  local wp, w1, p1, w2, p2 = tonumber(ARGV[i + 4]), 0, 0, 0, 0
  if not reset then
    local r = redis.call('GETRANGE', KEYS[8], int(s * 32), int(s * 32 + 31))
    if #r == 32 then w1, p1, w2, p2 = struct.unpack('>i8>i8>i8>i8', r) end
  end
  if wp > 0 then -- its packets in the call's window
    if window == w1 then
      if wp > p1 then p1 = wp end
    elseif window > w1 then
      w2, p2, w1, p1 = w1, p1, window, wp
    elseif window == w2 then
      if wp > p2 then p2 = wp end
    elseif window > w2 then
      w2, p2 = window, wp
    end
  end
  redis.call('SETRANGE', KEYS[8], int(s * 32), struct.pack('>i8>i8>i8>i8', w1, p1, w2, p2))
end
redis.call('BITFIELD', KEYS[5], unpack(sp))
redis.call('BITFIELD', KEYS[6], unpack(sb))
redis.call('BITFIELD', KEYS[7], unpack(sl))
return #dev
"""
)

# Retention: free the slots of devices silent since the cutoff, whose records have expired
# (RedisStore.expire_silent_devices checked them just before). A slot is freed only if it
# still holds that device and its last_seen is still at or before the cutoff: a device that
# sent again meanwhile (a merge wrote a newer last_seen at its slot) keeps it.
# KEYS: as WRITE_ROWS. ARGV: cutoff ms, then (slot, id) pairs. Returns the number freed.
FREE_SLOTS = (
    _INT
    + """
local cutoff, freed = tonumber(ARGV[1]), 0
local zero8, zero32 = string.rep('\\0', 8), string.rep('\\0', 32)
for i = 2, #ARGV, 2 do
  local slot, id = tonumber(ARGV[i]), ARGV[i + 1]
  if redis.call('HGET', KEYS[2], id) == ARGV[i] then
    local l = redis.call('BITFIELD', KEYS[7], 'GET', 'i64', '#' .. slot)[1]
    if l > 0 and l <= cutoff then
      for k = 5, 7 do redis.call('SETRANGE', KEYS[k], int(slot * 8), zero8) end
      redis.call('SETRANGE', KEYS[8], int(slot * 32), zero32)
      redis.call('HDEL', KEYS[2], id)
      redis.call('HDEL', KEYS[3], slot)
      redis.call('RPUSH', KEYS[4], slot)
      redis.call('ZREM', KEYS[1], id)
      freed = freed + 1
    end
  end
end
return freed
"""
)

# KEYS: marker, totals, rejected, rate
# ARGV: TTL, seq, packets, bytes, second, nrejected, (reason, count) * nrejected
MERGE_GLOBAL = (
    _MARKER
    + """
redis.call('HINCRBY', KEYS[2], 'packets', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[4])
local sec = tonumber(ARGV[5])
redis.call('HINCRBY', KEYS[4], ARGV[5], ARGV[3])
redis.call('HINCRBY', KEYS[4], ARGV[5] .. 'b', ARGV[4])
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
# KEYS: journal, journal index, journal chunks..., batch-id keys...
# ARGV: flush id, now ms, the journal's head (its batch ids and number of chunks), the
#       number of chunk keys
# The chunks (the merge calls, RedisStore.prepare) were written before, with a TTL: this
# claims every batch id for this flush, stores the head and keeps the chunks for as long
# as it lives, atomically — or, if any batch id is already taken by another flush, writes
# nothing and returns the conflicts as a flat list {position, state, ...} (state "c" =
# committed, "p:<flush>" = pending in another flush; the unclaimed chunks expire). A retry
# of the same flush finds its own claims and goes on.
PREPARE = """
local mine = 'p:' .. ARGV[1]
local first = 3 + tonumber(ARGV[4])
local conflicts = {}
for i = first, #KEYS do
  local state = redis.call('GET', KEYS[i])
  if state and state ~= mine then
    table.insert(conflicts, i - first + 1)
    table.insert(conflicts, state)
  end
end
if #conflicts > 0 then
  return conflicts
end
for i = first, #KEYS do
  redis.call('SET', KEYS[i], mine)
end
for i = 3, first - 1 do
  redis.call('PERSIST', KEYS[i])
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return conflicts
"""

# Exactly-once, step 3 of 3 (after every merge call of the journal was applied).
# KEYS: journal, journal index, journal chunks..., batch-id keys...
# ARGV: flush id, dedupe window seconds, the number of chunk keys
# The batch ids become "committed" for the dedupe window; the journal is dropped.
FINALIZE = """
local first = 3 + tonumber(ARGV[3] or '0')
for i = first, #KEYS do
  redis.call('SET', KEYS[i], 'c', 'EX', ARGV[2])
end
for i = 3, first - 1 do
  redis.call('DEL', KEYS[i])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# A claim given back: KEYS[1] deleted if it still holds ARGV[1] (its owner's), so that an
# owner whose claim expired never drops the next one's.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# The records of KEYS (any number, one hash slot in a cluster) for the reads: per key an
# empty array (no such device) or its fields flat, integers as integers and doubles as
# 17-digit strings (a Lua number in a reply would be truncated to an integer):
#   packets, bytes, first_seen, last_seen, nkinds, (kind, count) * nkinds,
#   nvalues, (name, count, sum, min, max, last, last_ts) * nvalues,
#   nseconds, (second, packets, bytes) * nseconds, (span start, packets, bytes) * the rest
READ_DEVICES = (
    _RECORD
    + """
local out = {}
for k = 1, #KEYS do
  local blob = redis.call('GET', KEYS[k])
  local f = {}
  if blob then
    local p, b, first, last, _, _, nk, nv, nf, nc, pos = struct.unpack(HEAD, blob)
    local r = {struct.unpack(body(nk, nv, nf + nc), blob, pos)}
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
    f[#f + 1] = nf
    for j = 2 * nk + 7 * nv + 1, 2 * nk + 7 * nv + 3 * (nf + nc) do f[#f + 1] = r[j] end
  end
  out[k] = f
end
return out
"""
)
