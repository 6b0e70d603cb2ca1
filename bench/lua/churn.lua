-- churn: each connection loops fetch -> resolve one held ticket -> close it -> fetch (which
-- tops the agent up by one). Every request counts; the fetch answer names the ticket to move.
package.path = "bench/lua/?.lua;" .. package.path
local common = require("common")
setup = common.setup
done = common.done

local headers
local phase = "fetch"
local ticket

function init(args)
  headers = {
    ["Authorization"] = common.auth(common.user_id(slot)),
    ["Content-Type"] = "application/json",
  }
end

local function move(status)
  return wrk.format("POST", "/api/agent/tickets/", headers,
    string.format('{"ticket_id": %s, "status": "%s"}', ticket, status))
end

function request()
  if phase == "resolve" then
    return move("resolved")
  elseif phase == "close" then
    return move("closed")
  end
  return wrk.format("GET", "/api/agent/tickets/", headers)
end

function response(status, hdrs, body)
  if status >= 300 then
    phase = "fetch"  -- start over from what the service says the agent holds
    return
  end
  if phase == "fetch" then
    ticket = string.match(body, '"id":%s*(%d+)')
    if ticket then phase = "resolve" end
  elseif phase == "resolve" then
    phase = "close"
  else
    phase = "fetch"
  end
end
