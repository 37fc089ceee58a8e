"""Deployment definitions (prefect.yaml), shipped with the package so `fishtune deploy` finds them in any install."""
