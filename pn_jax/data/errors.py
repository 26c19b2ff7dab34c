"""DataError, in a module of its own: every data module raises it and the package re-exports it,
so no submodule needs to import the package `pn_jax.data` (which would make an import cycle)."""


class DataError(ValueError):
  """Bad or missing data; the message names the file or domain and how to fix it."""
