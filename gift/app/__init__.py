"""The application on top of the gift library: the ``gift`` command line (`cli`), the fine-tuning loop
(`finetune`: `FinetuneConfig`, `finetune`), evaluation, the explainer and demo commands, data, and PNG
rendering. It turns the library's plain exceptions into one-line errors (`errors.UsageError`); the
library never imports it."""
