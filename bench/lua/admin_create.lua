-- admin-create: POST /api/tickets/ as the admin.
package.path = "bench/lua/?.lua;" .. package.path
local common = require("common")
setup = common.setup
done = common.done

local req
function init(args)
  local priorities = {"low", "normal", "high", "urgent"}
  req = wrk.format("POST", "/api/tickets/", {
    ["Authorization"] = common.auth(common.admin_id()),
    ["Content-Type"] = "application/json",
  }, string.format(
    '{"title": "Printer on floor %d is jammed", "description": "Reported by phone.", ' ..
    '"priority": "%s"}', slot, priorities[slot % 4 + 1]))
end

function request()
  return req
end
