"""The jobs camx runs over a folder: ``explain`` (:mod:`cam_cli.jobs.explain`) and
``evaluate`` (:mod:`cam_cli.jobs.evaluate`), both on the skeleton in
:mod:`cam_cli.jobs.base` (the model opened with one precision and memory-format
policy, the loader, the journal with its finalise and clean-up, timings, stop
and progress through callbacks)."""
