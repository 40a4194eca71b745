-- Runs an Argo CD health check against one object, the way Argo CD runs a
-- check from argocd-cm (argo-cd util/lua/lua.go):
--
--   lua5.1 tests/argocd/run.lua CHECK.lua OBJECT.json
--
-- prints {"status":...,"message":...}. The object's JSON nulls become absent
-- fields (Argo turns nil into Lua nil), the global `obj` is the object, and
-- the check sees only what Argo opens for it: the base, table and package
-- libraries and a safe os (time, date) — no string, math, io or debug
-- library, and no string methods. The check must `return hs`; a status Argo
-- does not know becomes Unknown, as in Argo.
local cjson = require "cjson"

local checkPath, objectPath = arg[1], arg[2]
if checkPath == nil or objectPath == nil then
  io.stderr:write("usage: lua5.1 run.lua CHECK.lua OBJECT.json\n")
  os.exit(2)
end

local file = assert(io.open(objectPath, "rb"))
local body = file:read("*a")
file:close()

local function dropNulls(v)
  if type(v) == "table" then
    for k, x in pairs(v) do
      if x == cjson.null then
        v[k] = nil
      else
        dropNulls(x)
      end
    end
  end
  return v
end
local object = dropNulls(cjson.decode(body))

local check, loadError = loadfile(checkPath)
if check == nil then
  io.stderr:write(tostring(loadError) .. "\n")
  os.exit(1)
end

local env = {}
for _, name in ipairs({
  "assert", "error", "getmetatable", "ipairs", "next", "pairs", "pcall", "print", "rawequal", "rawget",
  "rawset", "select", "setmetatable", "tonumber", "tostring", "type", "unpack", "xpcall", "_VERSION",
  "require", "module", "package",
}) do
  env[name] = _G[name]
end
env._G = env
env.table = table
env.os = { time = os.time, date = os.date, clock = os.clock }
env.obj = object
setfenv(check, env)

-- No string library in Argo: no ("x"):method() either, while the check runs.
local stringMeta = getmetatable("")
local stringIndex = stringMeta.__index
stringMeta.__index = nil
local ok, hs = pcall(check)
stringMeta.__index = stringIndex

if not ok then
  io.stderr:write("the check failed: " .. tostring(hs) .. "\n")
  os.exit(1)
end
if type(hs) ~= "table" then
  io.stderr:write("expect table output from Lua script, not " .. type(hs) .. "\n")
  os.exit(1)
end

local valid = { Healthy = true, Progressing = true, Degraded = true, Suspended = true, Missing = true, Unknown = true }
local status, message = hs.status, hs.message
if not valid[status] then
  status, message = "Unknown", "Lua returned an invalid health status"
end
if message == nil then
  message = ""
end
io.write('{"status":' .. cjson.encode(status) .. ',"message":' .. cjson.encode(tostring(message)) .. "}\n")
