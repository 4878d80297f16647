"""Built-in backends that ship with the core (the others are plugins under ``plugins/``).

``python``: apps whose functions are a Python module's public functions
(``runnel.backends.python``); the ``/v4`` function endpoints that call them are a
surface, ``runnel.surfaces.functions``.
"""
