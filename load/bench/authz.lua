-- wrk script for load/bench/gateway.sh: GET /v1/authz as nginx's auth_request sends it,
-- X-Original-Method GET and X-Original-URI $URI, the key picked at random from $KEYS_FILE.
-- With REQUEST_IDS=1 each request carries a fresh X-Request-Id (as nginx's $request_id does),
-- so every priced request is a charge of its own, made once.
local keys = {}
for line in io.lines(os.getenv("KEYS_FILE")) do
  if #line > 0 then keys[#keys + 1] = line end
end
assert(#keys > 0, "KEYS_FILE holds no key")
local uri = os.getenv("URI") or "/free/x"
local ids = os.getenv("REQUEST_IDS") == "1"
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 1000003)
local prefix = string.format("%08x", math.random(0, 0x7fffffff))
local n = 0
request = function()
  n = n + 1
  local h = {
    ["X-API-Key"] = keys[math.random(#keys)],
    ["X-Original-Method"] = "GET",
    ["X-Original-URI"] = uri,
  }
  if ids then h["X-Request-Id"] = prefix .. "-" .. n end
  return wrk.format("GET", nil, h, nil)
end
