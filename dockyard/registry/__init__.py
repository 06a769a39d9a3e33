"""dockyard's OCI Distribution registry: storage driver → blob store → linked store → HTTP
handlers → app, with an on-disk layout identical to CNCF distribution's."""
