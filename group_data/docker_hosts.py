"""Data for the docker_hosts group. The storage driver is chosen from facts unless set here."""

# Never hide images or containers of an old driver by switching (the default; a fleet-wide
# decision worth stating where operators look).
docker_storage_allow_switch = False
