"""The faces: pyfuse3 operations, the control socket and the command line."""
