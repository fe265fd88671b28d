"""The application on top of the gift library: the ``gift`` command line (`cli`) and its commands
(`commands`, one module each), on shared pieces below them: the run configuration (`run_config`), the
training loop (`train`), data (`data`), recipes, ``eval.json`` (`results`), processes and accuracy
(`runtime`), PNG rendering (`render`), options and errors. It turns the library's plain exceptions into
one-line errors (`errors.UsageError`); the library never imports it."""
