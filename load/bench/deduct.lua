-- wrk script for load/deduct.sh: POST /v1/credits/charge {"amount":1}, each request with a
-- key picked at random from $KEYS_FILE (one key per line; one line = the hot-account case).
local keys = {}
for line in io.lines(os.getenv("KEYS_FILE")) do
  if #line > 0 then keys[#keys + 1] = line end
end
assert(#keys > 0, "KEYS_FILE holds no key")
-- Each wrk thread has its own Lua state: seed each differently.
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 1000003)
wrk.method = "POST"
wrk.body = '{"amount":1}'
request = function()
  return wrk.format(nil, nil, {
    ["Authorization"] = "Bearer " .. keys[math.random(#keys)],
    ["Content-Type"] = "application/json",
  }, nil)
end
