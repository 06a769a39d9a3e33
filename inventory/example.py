"""A production-shaped inventory: real hosts over ssh, grouped by role. Copy it, put your own
addresses in, and run `pyinfra inventory/prod.py deploy.py`. Per-host data overrides the
defaults documented in the README (data keys are prefixed with their concern; each concern's
settings are validated in dockyard_deploys/settings.py). The topology is the seed's: an NFS
server, a registry host that mounts its export, and Docker hosts — different hosts.

The Docker hosts keep the volumes of the seed's WordPress-shaped stack
(group_data/docker_hosts.py: `db_data`, a local volume for the database, and `wp_content`,
NFS-backed from nfs-01's export `/srv/exports/wp-content` of group_data/storage.py), so the web
service runs on any of them:

    docker run -d --name db -v db_data:/var/lib/mysql -e MARIADB_… mariadb:11
    docker run -d --name web -v wp_content:/var/www/html/wp-content -p 80:80 … wordpress:6

A host may declare more in its own data (`docker_volumes`, `docker_volume_dirs`: the README's
"Docker volumes" table); host data replaces the group's list."""

_ssh = {"ssh_user": "deploy", "_sudo": True, "ssh_known_hosts_file": "~/.ssh/known_hosts"}

# Hosts that run the Docker engine (tier 1: engine and storage driver).
docker_hosts = [
    # The stack's database runs here: its dumps go to a host directory, and the old volume of a
    # retired service is removed (only an explicit `state: absent` removes anything).
    (
        "docker-01.example.net",
        {
            **_ssh,
            "docker_volumes": [
                {"name": "db_data", "labels": {"app": "wordpress", "tier": "db"}},
                {
                    "name": "wp_content",
                    "nfs": {"path": "/srv/exports/wp-content"},
                    "labels": {"app": "wordpress", "tier": "web"},
                },
                {"name": "legacy_uploads", "state": "absent"},
            ],
            "docker_volume_dirs": [
                {"path": "/srv/wordpress/backup", "owner": "root", "group": "root"},
                {"path": "/srv/wordpress/dumps", "owner": "999", "group": "999", "mode": "0700"},
            ],
        },
    ),
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
