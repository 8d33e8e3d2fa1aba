"""mailgate's built-in filter plugins, one module each (installed as ``mailgate.plugins``).

Each is an ordinary plugin written against the public API (``mailgate``) only,
exactly as a third-party plugin is. The core never imports these modules: it
loads them by name from the table ``mailgate.registry.BUILTINS``, which also
gives their default order. A policy enables a plugin by naming it under
``plugins:``; the policy's order is the run order. ``relay_access`` and
``auth_results`` are loaded even when not named (last).

``_state``, ``_throttle``, ``actions`` and ``scanning`` are not plugins: they hold code
that several built-ins share; ``_dkimverify`` is dkim's verifier.
"""
