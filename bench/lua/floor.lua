-- floor: the framework's own cost, a trivial async view that touches no database.
package.path = "bench/lua/?.lua;" .. package.path
local common = require("common")
setup = common.setup
done = common.done

local req
function init(args)
  req = wrk.format("GET", "/bench/floor/")
end

function request()
  return req
end
