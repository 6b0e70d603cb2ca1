-- poll: GET /api/agent/tickets/ by agents that already hold the cap.
package.path = "bench/lua/?.lua;" .. package.path
local common = require("common")
setup = common.setup
done = common.done

local req
function init(args)
  req = wrk.format("GET", "/api/agent/tickets/", {
    ["Authorization"] = common.auth(common.user_id(slot)),
  })
end

function request()
  return req
end
