"""The fault-injection suite: the CLI run as a user would, on bad input, kills and full disks."""
