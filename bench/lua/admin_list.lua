-- admin-list: GET /api/tickets/?page_size=20 as the admin (count and first page). The
-- harness sets BENCH_QUERY for the other lists (admin-list-open, admin-search: bench/run.py).
package.path = "bench/lua/?.lua;" .. package.path
local common = require("common")
setup = common.setup
done = common.done

local req
function init(args)
  local query = os.getenv("BENCH_QUERY") or "page_size=20"
  req = wrk.format("GET", "/api/tickets/?" .. query, {
    ["Authorization"] = common.auth(common.admin_id()),
  })
end

function request()
  return req
end
