"""Looking inside models: per-loop diagnostics (`diagnose`) and weights/routers (`inspect`)."""
