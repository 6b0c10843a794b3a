"""What the API (`app/`) and the worker (`worker/`) both need, in one leaf package.

The bundled base model (location, preparation, identity, device, loading), the training contract
(`TrainConfig` and its one `parse()`), the preference `Pair` with its one validator and prompt
hash, and the adapter store's folders (`AdapterStore`: version and staging folders, atomic
publish, cleanup). This package imports neither `app` nor `worker`
(tests/unit/test_import_direction.py checks), and imports torch and transformers only inside the
functions that need them.
"""
