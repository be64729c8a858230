"""The OpenGait host: registration, run-time CPU redirection, launcher, patches and result comparison.

Importing this package does not import OpenGait. OpenGait is not installable; it is a checkout
whose ``opengait/`` folder must be on ``sys.path`` under its own top-level names (``modeling``,
``utils``, ...), because its main script looks models and losses up on exactly those module
objects. :func:`qgait_plugin.opengait.env.import_opengait` does that for a given root (``--root``
or ``OPENGAIT_ROOT``); everything else here takes the namespace it returns.
"""
