-- admin-create: POST /api/tickets/ as the admin. BENCH_KEYS (set by the harness) picks the
-- Idempotency-Key each request carries:
--   ""       none (admin-create);
--   "fresh"  a new key per request (admin-create-keyed): "bench-<run>-<slot>-<n>", n = 1, 2,
--            ... per connection, <run> new for each run of wrk (BENCH_RUN), so keys never
--            repeat across connections or runs;
--   "repeat" one key per connection, "bench-<run>-<slot>-0", with the same body every time
--            (admin-create-replay): the connection's first request creates the ticket, every
--            later one is a retry answered from the stored answer.
-- All three count the answers marked Idempotent-Replayed (the same response hook, so the load
-- generator does the same work in each): 0 for the first two, all but one per connection for
-- the third; the harness reports it.
package.path = "bench/lua/?.lua;" .. package.path
local common = require("common")
setup = common.setup

local mode, run, headers, body, req
local sent = 0
replayed = 0  -- a global: done() reads it from each thread

function init(args)
  mode = os.getenv("BENCH_KEYS") or ""
  run = os.getenv("BENCH_RUN") or tostring(os.time())
  local priorities = {"low", "normal", "high", "urgent"}
  headers = {
    ["Authorization"] = common.auth(common.admin_id()),
    ["Content-Type"] = "application/json",
  }
  body = string.format(
    '{"title": "Printer on floor %d is jammed", "description": "Reported by phone.", ' ..
    '"priority": "%s"}', slot, priorities[slot % 4 + 1])
  if mode == "repeat" then
    headers["Idempotency-Key"] = string.format("bench-%s-%d-0", run, slot)
  elseif mode ~= "" and mode ~= "fresh" then
    error("BENCH_KEYS: unknown mode " .. mode)
  end
  req = wrk.format("POST", "/api/tickets/", headers, body)
end

function request()
  if mode == "fresh" then
    sent = sent + 1
    headers["Idempotency-Key"] = string.format("bench-%s-%d-%d", run, slot, sent)
    return wrk.format("POST", "/api/tickets/", headers, body)
  end
  return req
end

function response(status, hdrs, answer)
  for name, value in pairs(hdrs) do
    if string.lower(name) == "idempotent-replayed" and value == "true" then
      replayed = replayed + 1
    end
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(common.threads) do
    total = total + thread:get("replayed")
  end
  common.done(summary, latency, requests, {replayed = total})
end
