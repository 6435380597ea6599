"""Code that runs inside the guest. Stdlib only; imports nothing of mvm but core.protocol."""
