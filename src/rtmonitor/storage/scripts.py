"""Lua scripts that merge one flush into Redis atomically and idempotently.

原子合并：每个脚本在 Redis 内部一次性执行完，多个服务实例同时写同一设备也不会互相覆盖；
min/max/last 这类“比较后再写”的字段只能这样做到精确。幂等：脚本先 SET NX 一个以
flush id 命名的标记键，重试同一次 flush（例如响应在网络上丢了）时直接返回 0，不会重复计数。
"""

# KEYS[1]   marker (same hash slot as every device key of this call)
# KEYS[2..] device hashes
# ARGV[1]   marker TTL in seconds; then, per device in KEYS order:
#   packets, bytes, first_seen, last_seen, nkinds, (kind, count) * nkinds,
#   nvalues, (name, count, sum, min, max, last, last_ts) * nvalues
# Numbers arrive as the client's exact decimal strings and are stored as such: comparing
# with tonumber() is exact for doubles, while Lua's tostring() would round to 14 digits.
MERGE_DEVICES = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local i = 2
for k = 2, #KEYS do
  local key = KEYS[k]
  redis.call('HINCRBY', key, 'packets', ARGV[i])
  redis.call('HINCRBY', key, 'bytes', ARGV[i + 1])
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
    redis.call('HINCRBY', key, p .. 'n', ARGV[i + 1])
    -- pcall: a sum that would overflow to inf stays at its last finite value
    -- instead of aborting the script half-way.
    redis.pcall('HINCRBYFLOAT', key, p .. 'sum', ARGV[i + 2])
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
end
return 1
"""

# KEYS: marker, totals, rejected, devices, idx:packets, idx:bytes, idx:last_seen
# ARGV: TTL, packets, bytes, nrejected, (reason, count) * nrejected,
#       (device, packets, bytes, last_seen) * rest
MERGE_GLOBAL = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
redis.call('HINCRBY', KEYS[2], 'packets', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[3])
local nrejected = tonumber(ARGV[4])
local i = 5
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
  i = i + 4
end
return 1
"""
