"""Fleet-wide data for every host. Every key's default lives in its concern's settings object
(dockyard_deploys/settings.py) and in the README's tables; set a key here (or per group, per
host) only to change it."""

# Keep the engine enabled at boot on every host (the default, stated here as the fleet policy).
docker_engine_enabled = True
