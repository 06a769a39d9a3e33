"""Data for the docker_hosts group. The storage driver is chosen from facts unless set here; the
named volumes and host directories below are the seed's WordPress-shaped stack."""

# Never hide images or containers of an old driver by switching (the default; a fleet-wide
# decision worth stating where operators look).
docker_storage_allow_switch = False

# The seed's WordPress-shaped stack: the volumes its two services use, on every Docker host.
#   docker run -d --name db  -v db_data:/var/lib/mysql      … mariadb
#   docker run -d --name web -v wp_content:/var/www/html/wp-content -p 80:80 … wordpress
# `db_data` is a plain local volume (the database's files stay on this host's disk: a local
# volume whose labels drift is never recreated by the deploy, as that would delete them);
# `wp_content` is NFS-backed through the local driver (type=nfs, o=addr=<server>,nfsvers=4,
# device=:<path>) from the storage host's export of group_data/storage.py — with no `server`
# it is the first host of the `storage` group — so the web service may run on any Docker host and
# its uploads survive the container and the volume's re-creation. Nothing is ever removed
# unless an entry says `state: absent`; README "Docker volumes" lists every key.
docker_volumes = [
    {"name": "db_data", "labels": {"app": "wordpress", "tier": "db"}},
    {
        "name": "wp_content",
        "nfs": {"path": "/srv/exports/wp-content"},
        "labels": {"app": "wordpress", "tier": "web"},
    },
]

# Host directories for bind mounts: the database dumps of the stack's backup job
# (`-v /srv/wordpress/backup:/backup`), root-only (0750, the default mode; world-writable modes
# are refused unless an entry sets world_writable: true).
docker_volume_dirs = [{"path": "/srv/wordpress/backup", "owner": "root", "group": "root"}]
