"""pyinfra packaged deploys for dockyard, one module per concern; `deploy.py` composes them."""
