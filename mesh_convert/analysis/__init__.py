"""Looking inside models: per-loop diagnostics (`diagnose`, its figures in `plots`) and
weights/routers (`inspect`)."""
