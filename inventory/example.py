"""A production-shaped inventory: real hosts over ssh, grouped by role. Copy it, put your own
addresses in, and run `pyinfra inventory/prod.py deploy.py`. Per-host data overrides the
defaults documented in the README (data keys are prefixed with their concern; each concern's
settings are validated in dockyard_deploys/settings.py). The topology is the seed's: an NFS
server, a registry host that mounts its export, and Docker hosts — different hosts."""

_ssh = {"ssh_user": "deploy", "_sudo": True, "ssh_known_hosts_file": "~/.ssh/known_hosts"}

# Hosts that run the Docker engine (tier 1: engine and storage driver).
docker_hosts = [
    ("docker-01.example.net", {**_ssh}),
    # An old RHEL 7 engine on xfs made with ftype=0: devicemapper direct-lvm on a spare disk.
    (
        "docker-02.example.net",
        {
            **_ssh,
            "docker_engine_source": "docker-ce",
            "docker_engine_version": "24.0.9",
            "docker_storage_driver": "devicemapper",
            "docker_storage_device": "/dev/xvdf",
        },
    ),
    # A dedicated xfs (ftype=1) disk for the data root.
    ("docker-03.example.net", {**_ssh, "docker_storage_device": "/dev/vdb"}),
]

# The NFS server that holds persistent volumes and the registry's data (tier 2).
storage = [("nfs-01.example.net", {**_ssh})]

# The host that runs the TLS registry (tier 3). It is not in `storage`, so its data must be on
# an NFS mount of the storage host's export (the registry refuses to start on a local disk).
registry = [
    (
        "registry-01.example.net",
        {
            **_ssh,
            "nfs_client_mounts": [
                {"src": "nfs-01.example.net:/srv/exports/registry", "path": "/srv/registry"}
            ],
            "registry_data_dir": "/srv/registry",
        },
    )
]
