"""The commands: thin Hydra mains (``clpd train``, ``clpd eval``, ``clpd plan``) and the argparse
``clpd report``, each over a plain ``run_*`` function; :mod:`~clpd.commands.job` runs one inside a
Hydra job and records its status. Nothing below this package imports it."""
