"""The runtime loader: a rank's startup from the shared cache (backend, manager, traced model)."""
