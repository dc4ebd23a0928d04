-- wrk script for load/bench/gateway.sh: GET /v1/authz as nginx's auth_request sends it,
-- X-Original-Method GET and X-Original-URI $URI, the key picked at random from $KEYS_FILE.
-- With REQUEST_IDS=1 each request carries a fresh X-Request-Id (as nginx's $request_id does),
-- so every priced request is a charge of its own, made once.
--
-- The request text is built once per key in init(), not per request: the reference run
-- (/health/live) is wrk's static request with no script at all, and wrk shares the machine's
-- cores with the server, so a client that formats every request (a Lua table and
-- wrk.format per request) would be measured as part of the authorizer's cost. Per request
-- this script only picks a prebuilt request (and, with REQUEST_IDS, appends the id).
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
local built = {}

function init(args)
  for i, key in ipairs(keys) do
    local req = wrk.format("GET", nil, {
      ["X-API-Key"] = key,
      ["X-Original-Method"] = "GET",
      ["X-Original-URI"] = uri,
    }, nil)
    if ids then
      -- wrk.format ends the head with an empty line; the id goes in front of it.
      req = req:sub(1, #req - 2) .. "X-Request-Id: " .. prefix .. "-"
    end
    built[i] = req
  end
end

request = function()
  local req = built[math.random(#keys)]
  if ids then
    n = n + 1
    return req .. n .. "\r\n\r\n"
  end
  return req
end
