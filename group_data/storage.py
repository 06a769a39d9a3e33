"""Data for the storage group: what the NFS server exports. Clients default to every inventory
host's address, owner/group to the anonymous user (all_squash), mode 0750."""

# The registry's data (the default export) and the WordPress stack's wp-content, which the Docker
# hosts mount through their `wp_content` volume (group_data/docker_hosts.py).
nfs_server_exports = [
    {"path": "/srv/exports/registry"},
    {"path": "/srv/exports/wp-content"},
]
