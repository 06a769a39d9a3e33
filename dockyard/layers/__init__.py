"""The layer core: a content-addressable image store with graph drivers, commit and history."""
