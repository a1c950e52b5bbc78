"""Pipeline: one YAML file drives inspect -> merge -> export -> pack / engine -> verify ->
bench over many adapters, into an atomic, hashed artifact bundle, with a content-addressed
step cache. `spec`: the file format; `load`: reading a file; `plan`: the tasks in run
order; `steps`: each step over its stage's Python API; `cache`: the step cache; `run`: the
run and its bundle; `manifest`: pipeline-manifest.json."""
