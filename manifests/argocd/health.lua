-- Argo CD health check for matview.dev/MaterializedView (resource.customizations.health.matview.dev_MaterializedView).
-- Degraded when Stalled (only a spec change helps), Progressing until the latest generation is Ready.
local hs = {status = "Progressing", message = "Waiting for the operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
if obj.metadata ~= nil and obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Stalled" and condition.status == "True" then
    return {status = "Degraded", message = condition.message}
  end
end
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then
    if condition.status == "True" then
      return {status = "Healthy", message = condition.message}
    end
    return {status = "Progressing", message = condition.message}
  end
end
return hs
