"""Project-wide test setup.

``sidecar_core.testing`` is the project's own pytest plugin (transport parametrization, peer
deployments, the ``gpu`` skip and the ``SIDECAR_TEST_STRICT`` switch); ``pytester`` runs pytest
inside tests, to test that plugin.
"""

pytest_plugins = ["sidecar_core.testing", "pytester"]
