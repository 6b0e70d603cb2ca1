-- floor: the framework's own cost, a trivial async view that touches no database. It carries a
-- token header, as API calls do, so the middleware takes the API's path (the view checks none).
package.path = "bench/lua/?.lua;" .. package.path
local common = require("common")
setup = common.setup
done = common.done

local req
function init(args)
  req = wrk.format("GET", "/bench/floor/", {
    ["Authorization"] = common.auth(common.user_id(0)),
  })
end

function request()
  return req
end
