-- wrk script: POST /v1/completions with ~22 KB prompts (bench/overhead/run.py sets the sizes).
-- 16 shared prefixes x distinct suffixes, as in the serving benchmark, so prefix-aware routers do
-- their real work (tokenize, hash, look up) instead of hitting one cached prompt. The bodies are
-- built once per wrk thread from a fixed seed, outside the timed requests.
local prefix_words = tonumber(os.getenv("BENCH_PREFIX_WORDS") or "4150")
local suffix_words = tonumber(os.getenv("BENCH_SUFFIX_WORDS") or "60")
local num_bodies = tonumber(os.getenv("BENCH_NUM_BODIES") or "256")
local num_prefixes = tonumber(os.getenv("BENCH_NUM_PREFIXES") or "16")
local model = os.getenv("BENCH_MODEL") or "test-model"

local syl = {"ka", "ri", "to", "ne", "mu", "sa", "lo", "vi", "de", "pa", "su", "ko", "ra", "fe",
             "ti", "no", "ma", "gu", "le", "bi", "zo", "ha", "yu", "we", "xi", "ion", "ent", "ver"}
math.randomseed(4242)
local function words(n)
  local t = {}
  for i = 1, n do
    t[i] = syl[math.random(#syl)] .. syl[math.random(#syl)]
  end
  return table.concat(t, " ")
end

local prefixes = {}
for i = 1, num_prefixes do
  prefixes[i] = words(prefix_words)
end
local bodies = {}
for k = 1, num_bodies do
  local p = prefixes[(k - 1) % num_prefixes + 1]
  bodies[k] = '{"model":"' .. model .. '","prompt":"' .. p .. " " .. words(suffix_words)
    .. '","max_tokens":16,"temperature":0}'
end
local headers = {["Content-Type"] = "application/json"}
local i = 0

request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/v1/completions", headers, bodies[i])
end

done = function(summary, latency, requests)
  io.write(string.format("BODY_BYTES %d\n", #bodies[1]))
end
