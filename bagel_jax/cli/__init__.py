"""The command-line programs: ``sample.py`` (:mod:`.sample`, with :mod:`.checks` and :mod:`.chat`) and the entry of
``train.py`` (:mod:`.train`; its arguments are :mod:`bagel_jax.train.cli`). Installed as the console scripts
``bagel-sample`` and ``bagel-train`` (``pyproject.toml``); ``sample.py`` and ``train.py`` at the repository root
are thin entry points to the same functions."""
