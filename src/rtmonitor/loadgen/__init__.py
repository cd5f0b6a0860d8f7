"""The load generator behind `rtmonitor send` (and, later, `rtmonitor bench`)."""
