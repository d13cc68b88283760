"""Engine-side KV-cache event settings (topic naming, env-driven enablement)."""
