"""Fleet-wide data for every host. Each deploy's defaults live in its module's DEFAULTS and in
the README's table; set a key here (or per group, per host) only to change it."""

# Keep the engine enabled at boot on every host (the default, stated here as the fleet policy).
docker_engine_enabled = True
