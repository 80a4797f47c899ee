"""The lab testbed: a private broker, a coordinator and agents as processes on one machine."""
