"""Ray orchestration of a warm run: sizing, compile tasks, dispatcher, pool, stats actor."""
