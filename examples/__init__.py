"""The bundled demo dataset (demo-data/) and the script that regenerates it; shipped as package data for `fishtune demo`."""
