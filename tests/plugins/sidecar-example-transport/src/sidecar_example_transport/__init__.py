"""An example sidecar transport plugin: ``example-tcp`` (plain asyncio TCP with acknowledgements)."""
