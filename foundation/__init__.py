"""What the API (`app/`) and the worker (`worker/`) both need, in one leaf package.

The bundled base model (location, preparation, identity, device, loading), the training contract
(`TrainConfig` and its one `parse()`), the preference `Pair` with its one validator and prompt
hash, the adapter store's folders (`AdapterStore`: version and staging folders, atomic
publish, cleanup), and the one `quantile` that the judge, the benchmarks and the tests share.
This package imports neither `app` nor `worker` (tests/unit/test_import_direction.py checks),
and imports torch and transformers only inside the functions that need them.
"""
