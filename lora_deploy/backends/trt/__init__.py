"""TensorRT engines: build (build.py), refit (refit.py), time (timed.py).

Nothing in this package imports tensorrt at import time; versions.py holds every version
gate and the one place tensorrt is imported. The pure parts (profiles, manifest, weights,
convert, versions.build_plan) are tested here; the TensorRT calls have never run here.
"""
