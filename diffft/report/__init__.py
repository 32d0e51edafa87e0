"""The report layer: everything about a run's table, above the trainer (``diffft.train``).

- ``stages``: cached stages (the DDPM a fine-tuning starts from, an encoder, the compare rows),
  the stage rule and the include-list cache key;
- ``table``: the final evaluation of every row against the data floor, ``summary.md`` /
  ``summary.json`` / ``rows.json`` and the plots;
- ``references``: paper / baseline values keyed by row id (also read by ``diffft.aggregate``);
- ``checks``: the ``eval`` node's schema and checks, made before anything trains;
- ``summary``: reading and writing a run's result files.

It imports methods, data and metrics; nothing below it (methods, nets, data) imports it, and it
never imports ``diffft.train``: a stage is trained by the ``runner`` the trainer passes in.
"""
