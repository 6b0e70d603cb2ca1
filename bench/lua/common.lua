-- Shared by the wrk scripts: one connection per wrk thread (the harness runs -t N -c N), and
-- each connection authenticates as its own user, whose token the harness seeded:
-- key = the user's id, zero-padded to 40 digits. A JSON line with the figures ends the run.
local M = {}

local threads = {}
M.threads = threads  -- each thread's Lua state, for a script's own done()
local next_slot = 0

function M.setup(thread)
  thread:set("slot", next_slot)
  next_slot = next_slot + 1
  table.insert(threads, thread)
end

-- The user this connection acts as: the slot-th agent, or the admin.
function M.user_id(slot)
  local first = tonumber(os.getenv("BENCH_FIRST_AGENT"))
  return first + slot
end

function M.admin_id()
  return tonumber(os.getenv("BENCH_ADMIN_ID"))
end

function M.auth(user_id)
  return "Token " .. string.format("%040d", user_id)
end

-- ``extra``: more whole-number figures of the script's own, e.g. {replayed = 12}.
function M.done(summary, latency, requests, extra)
  local e = summary.errors
  local more = ""
  for name, value in pairs(extra or {}) do
    more = more .. string.format(', "%s": %d', name, value)
  end
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d%s}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max, more))
end

return M
