-- Argo CD health check for the egressguard.io/v1alpha1 kinds EgressGuard,
-- CIDRGroup, NodeShaping and Quarantine (argocd-cm key
-- resource.customizations.health.egressguard.io_<Kind>).
--
-- One script serves the four keys (the chart renders it under each): Argo runs
-- each check alone, and the kind-specific rules are two tests on obj.kind.
-- tests/tests/argocd.rs runs tests/argocd/fixtures of every kind through it.
--
-- Argo opens only the base, table, package and a safe os library for a check
-- from argocd-cm (no string, no math): this script uses none of them.
--
-- The status contract: status.observedGeneration and status.conditions on
-- every kind; Ready=True when what the spec asks is in force,
-- Reconciling=True only while rolling out, Stalled=True (Ready=False) for an
-- error a retry will not fix, Tampered=True when a node's shaping was altered.

local function findCondition(status, conditionType)
  if type(status) ~= "table" or type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if type(c) == "table" and c.type == conditionType then
      return c
    end
  end
  return nil
end

local function isTrue(c)
  return c ~= nil and c.status == "True"
end

local function text(v)
  if type(v) == "string" then
    return v
  end
  return ""
end

-- "Reason: message", or whichever of the two is there.
local function describe(c)
  local reason, message = text(c.reason), text(c.message)
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  if reason ~= "" then
    return reason
  end
  if message ~= "" then
    return message
  end
  return text(c.type) .. "=" .. text(c.status)
end

local function health(o)
  local metadata = o.metadata or {}
  local spec = o.spec or {}
  local status = o.status
  -- The NodeShaping status is the node agent's; the others are the operator's.
  local writer = "the operator"
  if o.kind == "NodeShaping" then
    writer = "the node agent"
  end

  if metadata.deletionTimestamp ~= nil then
    return "Progressing", "being deleted"
  end

  local generation = metadata.generation
  if type(status) ~= "table" or status.observedGeneration == nil
      or (generation ~= nil and status.observedGeneration ~= generation) then
    if generation == nil then
      return "Progressing", "waiting for " .. writer .. " to write a status"
    end
    return "Progressing", "waiting for " .. writer .. " to observe generation " .. tostring(generation)
  end

  local stalled = findCondition(status, "Stalled")
  if isTrue(stalled) then
    if o.kind == "Quarantine" and stalled.reason == "Paused" then
      return "Suspended", describe(stalled)
    end
    return "Degraded", describe(stalled)
  end

  local reconciling = findCondition(status, "Reconciling")
  if isTrue(reconciling) then
    return "Progressing", describe(reconciling)
  end

  local tampered = findCondition(status, "Tampered")
  if isTrue(tampered) then
    return "Degraded", describe(tampered)
  end

  local ready = findCondition(status, "Ready")
  if isTrue(ready) then
    if o.kind == "EgressGuard" and spec.mode == "Auto"
        and type(spec.quarantine) == "table" and spec.quarantine.paused == true then
      return "Suspended", "automatic quarantine paused"
    end
    return "Healthy", describe(ready)
  end
  if ready == nil then
    return "Progressing", "no Ready condition yet"
  end
  return "Progressing", describe(ready)
end

local hs = {}
hs.status, hs.message = health(obj)
return hs
