-- admin-list: GET /api/tickets/?page_size=20 as the admin (count and first page).
package.path = "bench/lua/?.lua;" .. package.path
local common = require("common")
setup = common.setup
done = common.done

local req
function init(args)
  req = wrk.format("GET", "/api/tickets/?page_size=20", {
    ["Authorization"] = common.auth(common.admin_id()),
  })
end

function request()
  return req
end
